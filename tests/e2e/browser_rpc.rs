//! A page in headless Chromium calls the app's backends through the packed
//! JavaScript client (`npm pack` of clients/js, its `dist/` served as ES
//! modules): it connects to `herald standalone` with a JWT (given in the
//! client's `connect` command), makes an rpc that a backend serving calls
//! answers (a JSON sum), one that no backend serves (404), and a send that
//! a backend consuming connection events receives as a message event of
//! the page's connection. tests/python/browser_rpc.py drives the browser.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use herald_proto::v1::{
    AckEventsRequest, CallAnswer, CallError, ConnectionAddress, ConsumeEventsRequest, Content, ServeCallsRequest,
    ServeCallsStart, call_answer, connection_event, content, serve_calls_request,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::browser::{BrowserScript, BrowserSockets};
use crate::support::{Herald, PATIENCE, grpc_client, tool};

const SECRET: &str = "a-secret-of-at-least-32-bytes-for-hs256";
/// The consumer group reading the page's message events.
const GROUP: &str = "browser-rpc";
/// What the page sends to the backends.
const SENT: &str = "hello from the browser";

/// The page's rpc is answered by the backend serving its method, an rpc no
/// backend serves is refused with 404, and its send reaches a consumer as a
/// message event of its connection, with its user.
#[test]
fn a_page_calls_a_backend_with_rpc_and_its_send_reaches_an_event_consumer() {
    let Some((browser, npm)) = page_tools() else {
        return;
    };
    let started = Instant::now();
    // Chromium starts, and the library is packed, while herald and the backends start.
    let mut script = BrowserScript::start("browser_rpc.py", &browser, &[]);
    let dir = script.dir().to_owned();
    let unpacking = std::thread::spawn(move || crate::browser_recovery::unpack(&npm, &dir));

    let herald = Herald::standalone(&["--client-auth", "jwt", "--jwt-secret", SECRET, "--events", "message"]);
    let broker = herald.address("broker");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime");
    let (calls, mut consumer) = runtime.block_on(async {
        let calls = serve_sums(&broker, "math.add").await;
        let consumer = grpc_client(&broker)
            .await
            .consume_events(ConsumeEventsRequest { group: GROUP.into(), max_unacked: 0 })
            .await
            .expect("consume events")
            .into_inner();
        (calls, consumer)
    });

    let dist = match unpacking.join() {
        Ok(dist) => dist,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let packed = started.elapsed();
    let plan = json!({
        "gateway": herald.ws_url(),
        "token": token("ana"),
        "rpcs": [["math.add", r#"{"a":2,"b":3}"#], ["nobody.home", "anyone?"]],
        "send": SENT,
    });
    script.say(&format!("open {}", json!({ "dist": dist, "plan": plan })));
    // Starting Chromium is the slow part.
    let report = script.answer("report", PATIENCE * 3);

    assert_eq!(report["errors"], json!([]), "no error on the page: {report}");
    assert_eq!(report["connected"]["userId"], "ana", "connected with the token: {report}");
    let address = ConnectionAddress {
        worker_id: report["connected"]["workerId"].as_str().expect("a worker id").to_owned(),
        connection_id: report["connected"]["connectionId"].as_str().expect("a connection id").to_owned(),
    };
    assert_eq!(address.worker_id, herald.worker_id());
    assert_eq!(report["rpcs"][0], json!({ "answer": { "text": "5" } }), "the backend's sum: {report}");
    let refused = &report["rpcs"][1]["error"];
    assert_eq!((&refused["name"], &refused["code"]), (&json!("HeraldError"), &json!(404)), "{report}");
    assert_eq!(report["sent"], true, "{report}");

    let call = calls.try_recv().expect("the backend got the page's call");
    assert_eq!(call, ("math.add".to_owned(), Some(address.clone()), "ana".to_owned()));
    assert!(calls.try_recv().is_err(), "one call reached the backend");

    let event = runtime.block_on(async {
        let batch = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("the message event in time")
            .expect("the stream goes on")
            .expect("a batch");
        let mut acks = grpc_client(&broker).await;
        let ack_ids = batch.events.iter().map(|e| e.ack_id.clone()).collect();
        acks.ack_events(AckEventsRequest { group: GROUP.into(), ack_ids }).await.expect("ack");
        assert_eq!(batch.events.len(), 1, "one event: {batch:?}");
        batch.events.into_iter().next().and_then(|e| e.event).expect("an event")
    });
    let Some(connection_event::Kind::Message(message)) = &event.kind else {
        panic!("a message event: {event:?}");
    };
    assert_eq!(message.content, Some(Content { body: Some(content::Body::Text(SENT.into())) }));
    assert_eq!(event.connection, Some(address));
    assert_eq!(event.user_id, "ana");
    eprintln!("browser_rpc: the library packed after {packed:?}; all done after {:?}", started.elapsed());
}

/// What the test needs: Python with Selenium, Chromium and its driver, and
/// npm; `None` (after saying why) when one is missing.
fn page_tools() -> Option<((PathBuf, PathBuf), PathBuf)> {
    let browser = BrowserSockets::tools()?;
    let npm = tool("npm")?;
    Some((browser, npm))
}

/// A JWT for `user`, valid for ten minutes.
fn token(user: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let claims = json!({ "sub": user, "iat": now, "exp": now + 600 });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
        .expect("sign a token")
}

/// A backend serving `method`: answers each call, whose data is JSON
/// `{"a": A, "b": B}`, with A + B as text, and refuses other data with 400.
/// Tells each call's method, caller and user on the channel it returns,
/// once the broker has taken it on.
async fn serve_sums(
    broker: &str,
    method: &str,
) -> std::sync::mpsc::Receiver<(String, Option<ConnectionAddress>, String)> {
    let mut client = grpc_client(broker).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let start = ServeCallsRequest {
        kind: Some(serve_calls_request::Kind::Start(ServeCallsStart { methods: vec![method.into()] })),
    };
    tx.send(start).await.expect("queue the start");
    // Answered once the backend is registered.
    let mut incoming =
        client.serve_calls(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("serve calls").into_inner();
    let (seen, calls) = std::sync::mpsc::channel();
    tokio::spawn(async move {
        while let Some(Ok(served)) = incoming.next().await {
            let call = served.call.unwrap_or_default();
            let _ = seen.send((call.method, call.connection, call.user_id));
            let sum = match call.data.and_then(|d| d.body) {
                Some(content::Body::Text(text)) => {
                    serde_json::from_str::<Value>(&text).ok().and_then(|v| Some(v["a"].as_i64()? + v["b"].as_i64()?))
                }
                _ => None,
            };
            let result = match sum {
                Some(sum) => call_answer::Result::Data(Content { body: Some(content::Body::Text(sum.to_string())) }),
                None => {
                    call_answer::Result::Error(CallError { code: 400, message: "want {\"a\": A, \"b\": B}".into() })
                }
            };
            let answer = CallAnswer { call_id: served.call_id, result: Some(result) };
            let _ = tx.send(ServeCallsRequest { kind: Some(serve_calls_request::Kind::Answer(answer)) }).await;
        }
    });
    calls
}
