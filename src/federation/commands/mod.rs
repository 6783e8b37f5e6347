//! Signed commands between instances: which capability each needs and what
//! the command log calls it (here), the receiver's side (`receive`, and
//! `stream` for `agent.watch`) and the sender's side (`send`, and `follow`
//! for `agent.watch`).

mod batches;
mod follow;
mod receive;
mod send;
mod stream;

pub use batches::{BatchCheck, BatchError};
pub use follow::RemoteWatch;

use crate::proto::federation as pb;

/// The command's type name, as the command log shows it.
pub fn command_type(command: &pb::command_payload::Command) -> &'static str {
    match command {
        pb::command_payload::Command::AgentSpawn(_) => "agent.spawn",
        pb::command_payload::Command::AgentStatus(_) => "agent.status",
        pb::command_payload::Command::AgentKill(_) => "agent.kill",
        pb::command_payload::Command::AgentList(_) => "agent.list",
        pb::command_payload::Command::AgentOutput(_) => "agent.output",
        pb::command_payload::Command::AgentWatch(_) => "agent.watch",
    }
}

/// Whether the command is answered by a stream (WatchCommand) rather than
/// one result (ExecuteCommand).
pub fn is_streamed(command: &pb::command_payload::Command) -> bool {
    matches!(command, pb::command_payload::Command::AgentWatch(_))
}

/// Whether running the command changes anything (a spawn or a kill), so that a
/// retry must get the stored result without running it again. Reads may run
/// again: their replay is caught when the message id is recorded.
pub fn changes_state(command: &pb::command_payload::Command) -> bool {
    match command {
        pb::command_payload::Command::AgentSpawn(_)
        | pb::command_payload::Command::AgentKill(_) => true,
        pb::command_payload::Command::AgentStatus(_)
        | pb::command_payload::Command::AgentList(_)
        | pb::command_payload::Command::AgentOutput(_)
        | pb::command_payload::Command::AgentWatch(_) => false,
    }
}

/// The capability a command needs on the connection. Listing one's own
/// agents is a status read of several, reading one's agent's output a read
/// of what it did, and watching one a status read that goes on, so
/// `agent.list`, `agent.output` and `agent.watch` need `agent.status`.
pub fn command_capability(command: &pb::command_payload::Command) -> &'static str {
    match command {
        pb::command_payload::Command::AgentSpawn(_) => "agent.spawn",
        pb::command_payload::Command::AgentStatus(_)
        | pb::command_payload::Command::AgentList(_)
        | pb::command_payload::Command::AgentOutput(_)
        | pb::command_payload::Command::AgentWatch(_) => "agent.status",
        pb::command_payload::Command::AgentKill(_) => "agent.kill",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_command_type_needs_its_own_capability() {
        use pb::command_payload::Command;
        let cases = [
            (
                Command::AgentSpawn(pb::AgentSpawnCommand::default()),
                "agent.spawn",
            ),
            (
                Command::AgentStatus(pb::AgentStatusCommand::default()),
                "agent.status",
            ),
            (
                Command::AgentKill(pb::AgentKillCommand::default()),
                "agent.kill",
            ),
            (
                Command::AgentList(pb::AgentListCommand::default()),
                "agent.status",
            ),
            (
                Command::AgentOutput(pb::AgentOutputCommand::default()),
                "agent.status",
            ),
            (
                Command::AgentWatch(pb::AgentWatchCommand::default()),
                "agent.status",
            ),
        ];
        for (command, capability) in cases {
            assert_eq!(command_capability(&command), capability);
        }
        assert_eq!(
            command_type(&Command::AgentList(pb::AgentListCommand::default())),
            "agent.list"
        );
    }
}
