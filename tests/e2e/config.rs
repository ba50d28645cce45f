//! Configuration: the example file loads, the precedence is flags, then
//! environment, then file, and a bad file stops the start naming the key.

use futures_util::StreamExt;

use crate::support::{Herald, TempDir, repo_root};

async fn greeting(herald: &Herald) -> String {
    let (mut ws, _) = tokio_tungstenite::connect_async(herald.ws_url()).await.unwrap();
    ws.next().await.unwrap().unwrap().into_text().unwrap().to_string()
}

#[tokio::test]
async fn the_example_config_file_loads_and_flags_override_it() {
    let example = repo_root().join("herald.example.toml");
    let herald = Herald::standalone(&["--config", example.to_str().unwrap()]);
    assert!(greeting(&herald).await.starts_with("Worker ID:"));
    assert_ne!(herald.addr("ws").port(), 4236, "the --ws-listen flag wins over the file");
}

#[tokio::test]
async fn the_environment_wins_over_the_file() {
    let dir = TempDir::new("config");
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, "[standalone]\ngreeting = \"json\"\n").unwrap();
    let config = ["--config", path.to_str().unwrap()];
    let from_file = Herald::standalone(&config);
    assert!(greeting(&from_file).await.starts_with('{'), "the file sets the JSON greeting");
    let from_env = Herald::standalone_with_env(&config, &[("HERALD_GREETING", "text")]);
    assert!(greeting(&from_env).await.starts_with("Worker ID:"), "HERALD_GREETING wins over the file");
}

#[test]
fn a_bad_config_file_stops_the_start_and_names_the_key() {
    let dir = TempDir::new("config");
    let path = dir.path().join("herald.toml");
    for (text, expected) in [
        ("[ws]\nmax-conections = 5\n", "unknown key \"max-conections\""),
        ("[ws]\nmax-connections = -5\n", "herald.toml: [ws] max-connections = \"-5\" is not valid"),
        ("max-connections = [1, {a = 2}]\n", "key \"max-connections\" must be"),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["ws", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["ws", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config file /nonexistent/herald.toml"));
}

#[test]
fn help_lists_every_option_with_its_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(["ws", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in
        ["--max-connections", "[default: 100000]", "[env: HERALD_MAX_CONNECTIONS=]", "--config", "--ping-interval"]
    {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}
