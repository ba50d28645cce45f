//! Fuzzes the client protocol's command reader (`herald_gateway_ws::protocol`):
//! whatever a client sends in a text frame, `parse` never panics; a command it
//! accepts has an id a JavaScript number holds; a refusal is one line, and one
//! with an id becomes a reply that is valid JSON echoing that id.

#![no_main]

use herald_gateway_ws::protocol::{self, code};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match protocol::parse(text) {
        Ok(command) => assert!((1..=(1u64 << 53) - 1).contains(&command.id), "id {} out of range", command.id),
        Err(refusal) => {
            assert!(!refusal.reason.contains(['\n', '\r']), "reason is not one line: {:?}", refusal.reason);
            if let Some(id) = refusal.id {
                let reply = protocol::refusal(id, code::BAD_COMMAND, &refusal.reason);
                let reply: serde_json::Value =
                    serde_json::from_str(reply.to_text().expect("a text reply")).expect("the reply is JSON");
                assert_eq!(reply["id"], id, "the reply echoes the id");
            }
        }
    }
});
