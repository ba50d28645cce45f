//! The API key every call to a broker carries, added by one interceptor
//! rather than by each call.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Adds `authorization: Bearer <key>` to every request, when a key is set.
#[derive(Debug, Clone, Default)]
pub(crate) struct ApiKey {
    authorization: Option<MetadataValue<Ascii>>,
}

/// The key cannot travel as gRPC metadata (it is not visible ASCII).
#[derive(Debug)]
pub(crate) struct NotAscii;

impl ApiKey {
    pub(crate) fn new(key: Option<&str>) -> Result<Self, NotAscii> {
        let authorization = match key {
            Some(key) => Some(format!("Bearer {key}").parse().map_err(|_| NotAscii)?),
            None => None,
        };
        Ok(Self { authorization })
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_travels_as_a_bearer_token() {
        let mut with_key = ApiKey::new(Some("0123456789abcdef")).unwrap();
        let request = with_key.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer 0123456789abcdef");
        let request = ApiKey::default().call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert!(ApiKey::new(Some("not\nascii")).is_err());
    }
}
