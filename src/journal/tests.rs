//! Unit tests of journal entries: merging never undoes a newer entry.

use super::*;

fn entry(steps: &[&str], done: bool, expires: u64) -> Entry {
    Entry {
        v: 1,
        expires_at_ms: expires,
        done,
        steps: steps
            .iter()
            .map(|s| (s.to_string(), serde_json::json!({ "step": s })))
            .collect(),
        intents: Vec::new(),
    }
}

#[test]
fn an_older_entry_read_back_never_undoes_a_newer_one() {
    // The re-read after a fence returns the LLM-only entry a zombie wrote after this
    // process's `done` entry: the merge keeps the event done.
    let newer = entry(&["classify", "publish"], true, 2_000);
    let older = entry(&["classify"], false, 1_000);
    for merged in [newer.merged(&older), older.merged(&newer)] {
        assert!(merged.done);
        assert_eq!(
            merged.steps.keys().collect::<Vec<_>>(),
            vec!["classify", "publish"]
        );
        assert_eq!(merged.expires_at_ms, 2_000);
    }
}

#[test]
fn merging_keeps_intents_once_and_the_first_output_of_a_step() {
    let mut a = entry(&["classify"], false, 10);
    a.intents.push("alert".into());
    let mut b = entry(&["classify"], false, 10);
    b.steps
        .insert("classify".into(), serde_json::json!({ "other": true }));
    b.intents.push("alert".into());
    let m = a.merged(&b);
    assert_eq!(m.intents, vec!["alert".to_string()]);
    assert_eq!(
        m.steps["classify"],
        serde_json::json!({ "step": "classify" })
    );
}
