//! Client channel namespaces: for each `<namespace>:` prefix, who may
//! subscribe to its channels, whether clients may publish to them, and how
//! much history its channels keep. A channel whose namespace is not
//! configured is refused, so that no channel is open to clients unless the
//! operator said so.
//!
//! Gateways read the access rules; brokers read the history rules. Both take
//! the same specifications (`--namespace`, `HERALD_NAMESPACES`), so one
//! setting serves a whole cluster.
//!
//! A namespace is given as one string, e.g.
//! `chat:subscribe=users,publish=subscribers` (see [`Namespace::parse`]).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use herald_proto::names;

use crate::duration;

/// Who may subscribe to a namespace's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRule {
    /// Any connection, anonymous ones included.
    Anyone,
    /// Connections with a user id (from their token or a backend's bind).
    Users,
    /// Connections whose connection token lists the channel in its
    /// `channels` claim.
    Listed,
    /// Connections that present a subscription token for the channel,
    /// signed by the backend with the client-auth keys.
    Token,
}

/// Who may publish to a namespace's channels from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRule {
    /// No client: only backends publish.
    Nobody,
    /// Connections subscribed to the channel.
    Subscribers,
}

/// Most publications one channel's history may keep.
pub const MAX_HISTORY_SIZE: usize = 100_000;
/// How long publications stay in a channel's history, by default.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);

/// How much of its past a namespace's channels keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRule {
    /// Most publications kept per channel; older ones are dropped.
    pub size: usize,
    /// How long a publication is kept.
    pub ttl: Duration,
    /// Whether a client that resubscribes may recover what it missed.
    pub recover: bool,
}

/// One namespace's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub subscribe: SubscribeRule,
    pub publish: PublishRule,
    /// Whether subscribers may ask who else is subscribed.
    pub presence: bool,
    /// Whether subscribers are told when a connection joins or leaves.
    pub join_leave: bool,
    /// The history its channels keep, if any.
    pub history: Option<HistoryRule>,
}

/// Why a namespace specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("namespace {spec:?}: {reason}")]
pub struct NamespaceError {
    spec: String,
    reason: String,
}

impl Namespace {
    /// Parses `<name>[:<option>,…]`, options being `subscribe=anyone|users|listed|token`
    /// (default `users`), `publish=nobody|subscribers` (default `nobody`),
    /// `presence=on|off` (default `off`), `join_leave=on|off` (default `off`), `history=<size>` (publications
    /// kept per channel; default 0, none), `history_ttl=<duration>` (default
    /// 5m) and `recover=on|off` (default `on` with history).
    pub fn parse(spec: &str) -> Result<Self, NamespaceError> {
        let refuse = |reason: String| NamespaceError { spec: spec.to_owned(), reason };
        let (name, options) = spec.split_once(':').unwrap_or((spec, ""));
        names::validate_namespace(name).map_err(|e| refuse(e.to_string()))?;
        let mut namespace = Namespace {
            name: name.to_owned(),
            subscribe: SubscribeRule::Users,
            publish: PublishRule::Nobody,
            presence: false,
            join_leave: false,
            history: None,
        };
        let mut size = 0;
        let mut ttl = None;
        let mut recover = None;
        for option in options.split(',').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("subscribe", "anyone")) => namespace.subscribe = SubscribeRule::Anyone,
                Some(("subscribe", "users")) => namespace.subscribe = SubscribeRule::Users,
                Some(("subscribe", "listed")) => namespace.subscribe = SubscribeRule::Listed,
                Some(("subscribe", "token")) => namespace.subscribe = SubscribeRule::Token,
                Some(("publish", "nobody")) => namespace.publish = PublishRule::Nobody,
                Some(("publish", "subscribers")) => namespace.publish = PublishRule::Subscribers,
                Some(("presence", "on")) => namespace.presence = true,
                Some(("presence", "off")) => namespace.presence = false,
                Some(("join_leave", "on")) => namespace.join_leave = true,
                Some(("join_leave", "off")) => namespace.join_leave = false,
                Some(("history", n)) => {
                    size = n
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_HISTORY_SIZE)
                        .ok_or_else(|| refuse(format!("history={n}: give a size from 0 to {MAX_HISTORY_SIZE}")))?;
                }
                Some(("history_ttl", d)) => {
                    let d = duration::parse(d).map_err(|e| refuse(format!("history_ttl: {e}")))?;
                    if d < Duration::from_secs(1) {
                        return Err(refuse("history_ttl must be 1s or more".into()));
                    }
                    ttl = Some(d);
                }
                Some(("recover", "on")) => recover = Some(true),
                Some(("recover", "off")) => recover = Some(false),
                _ => {
                    return Err(refuse(format!(
                        "unknown option {option:?}: use subscribe=anyone|users|listed|token, \
                         publish=nobody|subscribers, presence=on|off, join_leave=on|off, history=<size>, \
                         history_ttl=<duration> and recover=on|off"
                    )));
                }
            }
        }
        if size == 0 {
            if ttl.is_some() || recover == Some(true) {
                return Err(refuse("history_ttl and recover=on need history=<size> above 0".into()));
            }
        } else {
            namespace.history =
                Some(HistoryRule { size, ttl: ttl.unwrap_or(DEFAULT_HISTORY_TTL), recover: recover.unwrap_or(true) });
        }
        Ok(namespace)
    }

    /// Whether its rules need tokens checked by the gateway's client auth.
    pub fn needs_client_auth(&self) -> bool {
        matches!(self.subscribe, SubscribeRule::Listed | SubscribeRule::Token)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subscribe = match self.subscribe {
            SubscribeRule::Anyone => "anyone",
            SubscribeRule::Users => "users",
            SubscribeRule::Listed => "listed",
            SubscribeRule::Token => "token",
        };
        let publish = match self.publish {
            PublishRule::Nobody => "nobody",
            PublishRule::Subscribers => "subscribers",
        };
        let presence = if self.presence { "on" } else { "off" };
        write!(f, "{}:subscribe={subscribe},publish={publish},presence={presence}", self.name)?;
        if self.join_leave {
            write!(f, ",join_leave=on")?;
        }
        if let Some(history) = &self.history {
            let recover = if history.recover { "on" } else { "off" };
            let ttl = duration::format(history.ttl);
            write!(f, ",history={},history_ttl={ttl},recover={recover}", history.size)?;
        }
        Ok(())
    }
}

/// Every configured namespace, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces(HashMap<String, Namespace>);

impl Namespaces {
    /// Parses each specification; a name given twice is refused.
    pub fn parse<'a>(specs: impl IntoIterator<Item = &'a str>) -> Result<Self, NamespaceError> {
        Self::new(specs.into_iter().map(Namespace::parse).collect::<Result<Vec<_>, _>>()?)
    }

    /// The namespaces given; a name given twice is refused.
    pub fn new(list: Vec<Namespace>) -> Result<Self, NamespaceError> {
        let mut all = HashMap::new();
        for namespace in list {
            if all.contains_key(&namespace.name) {
                return Err(NamespaceError { spec: namespace.to_string(), reason: "given twice".into() });
            }
            all.insert(namespace.name.clone(), namespace);
        }
        Ok(Self(all))
    }

    /// The namespace of a client channel, when it is configured.
    pub fn of(&self, channel: &str) -> Option<&Namespace> {
        names::client_channel(channel).and_then(|(namespace, _)| self.0.get(namespace))
    }

    /// The history a client channel keeps, if its namespace keeps one.
    pub fn history_of(&self, channel: &str) -> Option<&HistoryRule> {
        self.of(channel).and_then(|namespace| namespace.history.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.0.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_a_name_and_its_options_with_safe_defaults() {
        let chat = Namespace::parse("chat:subscribe=anyone,publish=subscribers,presence=on").unwrap();
        assert_eq!(
            (chat.subscribe, chat.publish, chat.presence),
            (SubscribeRule::Anyone, PublishRule::Subscribers, true)
        );
        assert_eq!(chat.to_string(), "chat:subscribe=anyone,publish=subscribers,presence=on");
        let news = Namespace::parse("news").unwrap();
        assert_eq!((news.subscribe, news.publish, news.presence), (SubscribeRule::Users, PublishRule::Nobody, false));
        assert!(Namespace::parse("secret:subscribe=token").unwrap().needs_client_auth());
        assert!(!news.needs_client_auth());
    }

    #[test]
    fn malformed_namespaces_are_refused_with_the_reason() {
        for bad in [
            "",
            "a.b",
            "chat:subscribe=everyone",
            "chat:publish",
            "chat:history=-1",
            "chat:history=100001",
            "chat:history_ttl=5m",
            "chat:history=10,history_ttl=0s",
            "chat:recover=on",
            "chat:presence=yes",
        ] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
        let twice = Namespaces::parse(["chat", "chat:subscribe=anyone"]).unwrap_err();
        assert_eq!(twice.to_string(), "namespace \"chat:subscribe=anyone,publish=nobody,presence=off\": given twice");
    }

    #[test]
    fn history_keeps_a_size_for_a_time_and_recovers_unless_told_not_to() {
        let feed = Namespace::parse("feed:history=100,history_ttl=10m").unwrap();
        assert_eq!(feed.history, Some(HistoryRule { size: 100, ttl: Duration::from_secs(600), recover: true }));
        assert_eq!(
            feed.to_string(),
            "feed:subscribe=users,publish=nobody,presence=off,history=100,history_ttl=600s,recover=on"
        );
        assert_eq!(Namespace::parse(&feed.to_string()).unwrap(), feed, "a namespace reads back");
        let room = Namespace::parse("room:join_leave=on").unwrap();
        assert!(room.join_leave);
        assert_eq!(Namespace::parse(&room.to_string()).unwrap(), room);
        let quiet = Namespace::parse("quiet:history=5,recover=off").unwrap();
        assert_eq!(quiet.history, Some(HistoryRule { size: 5, ttl: DEFAULT_HISTORY_TTL, recover: false }));
        assert_eq!(Namespace::parse("plain:history=0").unwrap().history, None);
        let all = Namespaces::parse(["feed:history=100", "chat"]).unwrap();
        assert_eq!(all.history_of("feed:a").map(|h| h.size), Some(100));
        assert_eq!(all.history_of("chat:a"), None);
    }

    #[test]
    fn a_channel_finds_its_namespace_only_when_configured() {
        let all = Namespaces::parse(["chat:subscribe=anyone"]).unwrap();
        assert_eq!(all.of("chat:room-1").map(|n| n.name.as_str()), Some("chat"));
        assert_eq!(all.of("news:today"), None);
        assert_eq!(all.of("chat"), None, "a channel without a namespace is not a client channel");
    }
}
