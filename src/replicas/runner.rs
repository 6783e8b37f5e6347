//! The runner id: the UUID that names one daemon (one data dir) as the
//! supervisor of the agents it starts. It is kept in `<data_dir>/agents/runner-id`,
//! so it survives restarts, and differs between replicas sharing a database.

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
