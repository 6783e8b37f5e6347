//! The runner id: the UUID that names one daemon (one data dir) as the
//! supervisor of the agents it starts. It is kept in `<data_dir>/agents/runner-id`,
//! so it survives restarts, and differs between replicas sharing a database.
//!
//! Its first four bytes are its tag, which the ids of the agents it starts
//! end with ([`agent_id_for`]): a replica asked about an agent it does not
//! run can guess the replica that does from the id alone, before (and
//! instead of) reading the agent's record. The tag is a hint, never trusted:
//! the replica it names checks the agent as it would any call.

use std::path::Path;

/// The file in `<data_dir>/agents` that holds the runner id.
pub const RUNNER_ID_FILE: &str = "runner-id";

/// Reads `<agents_dir>/runner-id`, creating it with a new UUID the first time.
pub fn load_or_create_runner_id(agents_dir: &Path) -> std::io::Result<String> {
    let path = agents_dir.join(RUNNER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        Ok(_) | Err(_) => {
            let runner_id = uuid::Uuid::new_v4().to_string();
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, &runner_id)?;
            std::fs::rename(&temporary, &path)?;
            Ok(runner_id)
        }
    }
}

/// The tag of `runner_id`: its first four bytes (`None` if it is not a UUID).
pub fn runner_tag(runner_id: &str) -> Option<[u8; 4]> {
    let bytes = *uuid::Uuid::parse_str(runner_id).ok()?.as_bytes();
    Some([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The runner tag an agent id carries: its last four bytes (`None` if it is
/// not a UUID). Agents made before tags, or by a runner whose id is not a
/// UUID, carry random bytes there, which name no runner (or, rarely, a
/// wrong one, which then answers that it does not run the agent).
pub fn agent_runner_tag(agent_id: &str) -> Option<[u8; 4]> {
    let bytes = *uuid::Uuid::parse_str(agent_id).ok()?.as_bytes();
    Some([bytes[12], bytes[13], bytes[14], bytes[15]])
}

/// A new agent id for an agent `runner_id` starts: a UUIDv7 (ids sort
/// roughly by when they were made) whose last four random bytes are the
/// runner's tag. It keeps 42 random bits beside its millisecond timestamp.
pub fn agent_id_for(runner_id: &str) -> String {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    if let Some(tag) = runner_tag(runner_id) {
        bytes[12..16].copy_from_slice(&tag);
    }
    uuid::Uuid::from_bytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_id_carries_its_runners_tag_and_stays_a_uuid_v7() {
        let runner = uuid::Uuid::new_v4().to_string();
        let first = agent_id_for(&runner);
        let second = agent_id_for(&runner);
        assert_ne!(first, second);
        let parsed = uuid::Uuid::parse_str(&first).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(agent_runner_tag(&first), runner_tag(&runner));
        let other = uuid::Uuid::new_v4().to_string();
        assert_ne!(runner_tag(&other), runner_tag(&runner));
        assert_eq!(runner_tag("not-a-uuid"), None);
        assert_eq!(agent_runner_tag("no-such-agent"), None);
    }
}
