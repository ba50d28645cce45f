//! The headline browser test: a page in headless Chromium follows a channel
//! with history through the packed JavaScript client (`npm pack` of
//! clients/js, its `dist/` served as ES modules), given two gateways, while
//! 10,000 numbered messages are published. Mid-stream the page's gateway,
//! the broker that gateway is linked to, or NATS dies; the page must end
//! with every message once, in order, and every resubscription recovered.
//! tests/python/browser_recovery.py drives the browser.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use herald_proto::v1::target;
use serde_json::{Value, json};

use crate::browser::{BrowserScript, BrowserSockets};
use crate::support::{Cluster, Herald, PATIENCE, TempDir, grpc_client, repo_root, text_publish, tool};

/// The channel the page follows; `feed:` keeps more than every message.
const CHANNEL: &str = "feed:live";
const NAMESPACE: [&str; 2] = ["--namespace", "feed:subscribe=anyone,history=20000,history_ttl=5m"];
const MESSAGES: usize = 10_000;
/// How many messages the page has when the test kills something.
const STRIKE_AT: usize = MESSAGES / 4;
/// The publisher pauses this long after each hundred messages: a steady
/// pace that keeps it publishing well past the strike.
const PACE: Duration = Duration::from_millis(10);
/// How long the page may go without a new publication before the test
/// gives up on it: longer than any outage the tests cause.
const STALL_PATIENCE: Duration = Duration::from_secs(20);

/// A page whose gateway is killed reconnects to the other gateway and
/// resubscribes there, recovering what it missed from the broker's history.
#[test]
fn a_page_whose_gateway_is_killed_gets_every_message_once_in_order_from_the_other_gateway() {
    let Some(tools) = PageTools::find() else {
        return;
    };
    let _turn = one_at_a_time();
    let page = RecoveringPage::launch(&tools);
    let broker = Herald::broker(&NAMESPACE);
    let brokers = broker.address("broker");
    let mut doomed = Herald::ws(&brokers, &NAMESPACE);
    let survivor = Herald::ws(&brokers, &NAMESPACE);

    let report = follow_through(page, [doomed.ws_url(), survivor.ws_url()], brokers, || doomed.kill());
    report.assert_every_message_once_in_order();
    assert_eq!(report.connected, [doomed.worker_id(), survivor.worker_id()], "the page moved to the other gateway");
    assert!(!report.recoveries.is_empty(), "the page resubscribed on the other gateway");
    report.assert_every_recovery_complete();
}

/// In a 3-broker cluster the broker the page's gateway is linked to is
/// killed: the gateway fails over and fills the gap itself, or has the page
/// resubscribe; either way nothing is lost or doubled.
#[test]
fn a_page_whose_gateways_broker_is_killed_gets_every_message_once_in_order() {
    let Some(tools) = PageTools::find() else {
        return;
    };
    let _turn = one_at_a_time();
    let Some(mut cluster) = Cluster::start(3, &NAMESPACE) else {
        return;
    };
    let page = RecoveringPage::launch(&tools);
    let linked_to = format!("{},{}", cluster.address(0), cluster.address(1));
    let gateway = Herald::ws(&linked_to, &NAMESPACE);
    let linked = (0..2)
        .find(|i| cluster.brokers[*i].metric("herald_broker_sessions") == 1.0)
        .expect("a broker the page's gateway is linked to");
    let spare = Herald::ws(&linked_to, &NAMESPACE);

    let publish_via = cluster.address(2);
    let report =
        follow_through(page, [gateway.ws_url(), spare.ws_url()], publish_via, || cluster.brokers[linked].kill());
    report.assert_every_message_once_in_order();
    report.assert_every_recovery_complete();
    assert!(gateway.metric("herald_ws_broker_disconnects_total") >= 1.0, "the page's gateway failed over");
}

/// NATS restarts mid-stream under a 2-broker cluster; the history is in
/// JetStream's file storage (the default), so it survives, and the page
/// misses nothing.
#[test]
fn a_page_gets_every_message_once_in_order_across_a_nats_restart() {
    let Some(tools) = PageTools::find() else {
        return;
    };
    let _turn = one_at_a_time();
    let Some(mut cluster) = Cluster::start(2, &NAMESPACE) else {
        return;
    };
    let page = RecoveringPage::launch(&tools);
    let gateway = Herald::ws(&cluster.address(0), &NAMESPACE);
    let spare = Herald::ws(&cluster.address(0), &NAMESPACE);

    let publish_via = cluster.address(1);
    let report = follow_through(page, [gateway.ws_url(), spare.ws_url()], publish_via, || cluster.nats.restart());
    report.assert_every_message_once_in_order();
    report.assert_every_recovery_complete();
}

/// Waits for this test's turn: the tests here run one at a time, as each
/// keeps Chromium and several herald processes busy, and two at once on a
/// 2-core machine only make each other twice as slow.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the page on `gateways`, publishes every message through
/// `publish_via`, runs `strike` once the page has [`STRIKE_AT`] of them, and
/// reports what the page got once it has them all.
fn follow_through(
    mut page: RecoveringPage,
    gateways: [String; 2],
    publish_via: String,
    strike: impl FnOnce(),
) -> PageReport {
    page.open(&gateways);
    let started = Instant::now();
    let publisher = Publisher::start(publish_via);
    let struck_at = page.wait_for(STRIKE_AT);
    strike();
    let struck = started.elapsed();
    page.wait_for(MESSAGES);
    let followed = started.elapsed();
    publisher.finish();
    let report = page.report();
    eprintln!(
        "browser_recovery: struck at {struck_at} after {struck:?}, all {MESSAGES} after {followed:?}; \
         connections {:?}, recoveries {:?}",
        report.connected, report.recoveries
    );
    report
}

/// What the tests need: Python with Selenium, Chromium and its driver, and npm.
struct PageTools {
    /// Chromium and its driver.
    browser: (PathBuf, PathBuf),
    npm: PathBuf,
}

impl PageTools {
    /// The tools, or `None` (after saying why) when one is missing.
    fn find() -> Option<PageTools> {
        let browser = BrowserSockets::tools()?;
        let npm = tool("npm")?;
        Some(PageTools { browser, npm })
    }
}

/// The library as `npm pack` makes it, packed once for every test here.
static TARBALL: OnceLock<Vec<u8>> = OnceLock::new();

/// Packs clients/js. From a copy of its sources: `npm pack` builds `dist/`
/// first, which must not change under anything reading clients/js/dist.
fn pack(npm: &Path) -> Vec<u8> {
    let sources = repo_root().join("clients/js");
    let node_modules = sources.join("node_modules");
    assert!(
        node_modules.is_dir(),
        "{} is missing: run `npm ci --prefix clients/js` first (scripts/test does)",
        node_modules.display()
    );
    let work = TempDir::new("herald-client-pack");
    let copy = work.path().join("herald-client");
    std::fs::create_dir(&copy).expect("create the copy's directory");
    for entry in std::fs::read_dir(&sources).expect("list clients/js") {
        let path = entry.expect("a clients/js entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name == "node_modules" || name == "dist" || name.ends_with(".tgz") {
            continue;
        }
        run(Command::new("cp").arg("-R").arg(&path).arg(&copy));
    }
    std::os::unix::fs::symlink(&node_modules, copy.join("node_modules")).expect("link node_modules");
    let packed =
        run(Command::new(npm).args(["pack", "--json", "--pack-destination"]).arg(work.path()).current_dir(&copy));
    let packed: Value =
        serde_json::from_str(&packed).unwrap_or_else(|e| panic!("npm pack printed no JSON ({e}): {packed}"));
    let tarball = packed[0]["filename"].as_str().unwrap_or_else(|| panic!("npm pack named no tarball: {packed}"));
    std::fs::read(work.path().join(tarball)).unwrap_or_else(|e| panic!("read {tarball} ({e})"))
}

/// Extracts the packed library (packed once for every test) into `into`;
/// returns the extracted library's `dist/`, where a page imports it from.
pub(crate) fn unpack(npm: &Path, into: &Path) -> PathBuf {
    let tarball = into.join("herald-client.tgz");
    std::fs::write(&tarball, TARBALL.get_or_init(|| pack(npm))).expect("write the tarball");
    run(Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(into));
    into.join("package/dist")
}

/// Runs `command`; panics with its output unless it succeeds. Returns its standard output.
fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Publishes "1" to "10000" to [`CHANNEL`] through one broker, from a thread
/// of its own: each with an idempotency key, retried until taken (across a
/// broker or NATS outage), a hundred at a time.
struct Publisher(std::thread::JoinHandle<()>);

impl Publisher {
    fn start(broker: String) -> Publisher {
        Publisher(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(publish_numbers(&broker));
        }))
    }

    /// Waits until every message was published.
    fn finish(self) {
        if let Err(panic) = self.0.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

async fn publish_numbers(broker: &str) {
    let mut grpc = grpc_client(broker).await;
    for i in 1..=MESSAGES {
        let mut request = text_publish(target::Kind::Channel(CHANNEL.into()), &i.to_string());
        request.idempotency_key = format!("{CHANNEL}-{i}");
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        while let Err(status) = grpc.publish(request.clone()).await {
            assert!(tokio::time::Instant::now() < deadline, "publish {i} refused for too long: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if i % 100 == 0 {
            tokio::time::sleep(PACE).await;
        }
    }
}

/// The page, in headless Chromium, following [`CHANNEL`] with the packed
/// library; driven by tests/python/browser_recovery.py over its standard
/// input and output.
struct RecoveringPage {
    /// The script; its directory holds the unpacked library it serves.
    script: BrowserScript,
    /// Packing and unpacking the library, until [`Self::open`] waits for it.
    unpacking: Option<std::thread::JoinHandle<()>>,
}

impl RecoveringPage {
    /// Starts Chromium and, meanwhile, packs (once for every test here) and
    /// unpacks the library. Returns before either is done, so that the test
    /// starts its servers meanwhile: the page opens later, with [`Self::open`].
    fn launch(tools: &PageTools) -> RecoveringPage {
        let script = BrowserScript::start("browser_recovery.py", &tools.browser, &[]);
        let (npm, into) = (tools.npm.clone(), script.dir().to_owned());
        let unpacking = std::thread::spawn(move || {
            unpack(&npm, &into);
        });
        RecoveringPage { script, unpacking: Some(unpacking) }
    }

    /// Opens the page with `gateways` in this order, and waits until its
    /// subscription took effect on the first one.
    fn open(&mut self, gateways: &[String]) {
        if let Some(Err(panic)) = self.unpacking.take().map(std::thread::JoinHandle::join) {
            std::panic::resume_unwind(panic);
        }
        let dist = self.script.dir().join("package/dist");
        self.say(&format!("open {}", json!({ "dist": dist, "gateways": gateways, "channel": CHANNEL })));
        // Starting Chromium is the slow part.
        let ready = self.answer("ready", PATIENCE * 3);
        assert_eq!(ready["subscribed"][0]["resubscribed"], false, "subscribed once: {ready}");
    }

    /// Waits until the page has `count` publications, as long as it keeps
    /// getting more; returns how many it has.
    fn wait_for(&mut self, count: usize) -> usize {
        let mut had = None;
        loop {
            let within = STALL_PATIENCE.as_secs();
            self.say(&format!("wait {}", json!({ "publications": count, "within": within })));
            let has = self.answer("count", STALL_PATIENCE + PATIENCE).as_u64().expect("a count");
            let has = usize::try_from(has).expect("a count fits usize");
            if has >= count {
                return has;
            }
            if had == Some(has) {
                let report = self.report();
                panic!(
                    "the page got no publication in {STALL_PATIENCE:?}, stuck at {has} of {count}; last {:?}, \
                     recoveries {:?}, connected {:?}, errors {:?}",
                    report.publications.last(),
                    report.recoveries,
                    report.connected,
                    report.errors
                );
            }
            had = Some(has);
        }
    }

    /// What the page recorded, after a short wait for anything unexpected.
    fn report(&mut self) -> PageReport {
        self.say("report");
        PageReport::read(&self.answer("report", PATIENCE))
    }

    fn say(&mut self, line: &str) {
        self.script.say(line);
    }

    fn answer(&mut self, word: &str, within: Duration) -> Value {
        self.script.answer(word, within)
    }
}

/// What the page recorded.
struct PageReport {
    /// Every publication's text, in the order the library handed them on.
    publications: Vec<String>,
    /// For each time the subscription took effect again, whether it
    /// recovered everything missed.
    recoveries: Vec<bool>,
    /// The worker id of each connection, in order.
    connected: Vec<String>,
    /// The library's `error` events and the page's uncaught errors.
    errors: Vec<String>,
}

impl PageReport {
    fn read(report: &Value) -> PageReport {
        let list = |name: &str| report[name].as_array().unwrap_or_else(|| panic!("a {name} list in {report}")).iter();
        let strings = |name: &str| list(name).map(|v| v.as_str().unwrap_or_default().to_owned()).collect();
        PageReport {
            publications: strings("publications"),
            recoveries: list("subscribed")
                .filter(|s| s["resubscribed"] == true)
                .map(|s| s["recovered"] == true)
                .collect(),
            connected: strings("connected"),
            errors: strings("errors"),
        }
    }

    /// "1" to "10000", each once, in order; and no error.
    fn assert_every_message_once_in_order(&self) {
        let expected: Vec<String> = (1..=MESSAGES).map(|i| i.to_string()).collect();
        if self.publications != expected {
            let distinct: HashSet<&String> = self.publications.iter().collect();
            panic!(
                "every message once, in order: {} received, {} distinct, {} duplicates, first difference at {:?}",
                self.publications.len(),
                distinct.len(),
                self.publications.len() - distinct.len(),
                self.publications.iter().zip(&expected).position(|(got, want)| got != want)
            );
        }
        assert!(self.errors.is_empty(), "the page saw errors: {:?}", self.errors);
    }

    fn assert_every_recovery_complete(&self) {
        assert!(self.recoveries.iter().all(|r| *r), "every resubscription recovered: {:?}", self.recoveries);
    }
}
