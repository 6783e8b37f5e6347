//! The connection state machine: which operator action or peer notice may move a
//! connection from which state to which. Pure: no I/O, no tonic.

use crate::proto::federation as pb;

/// State of a federation connection (see `ConnectionState` in envelope.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Requested, not yet accepted.
    Pending,
    /// Accepted: commands flow within the granted capabilities.
    Active,
    /// Paused by one side.
    Suspended,
    /// Terminal: ended by one side.
    Disconnected,
    /// Terminal: the request was refused.
    Rejected,
}

impl ConnectionState {
    /// Every state, for parsing.
    pub const ALL: [ConnectionState; 5] = [
        Self::Pending,
        Self::Active,
        Self::Suspended,
        Self::Disconnected,
        Self::Rejected,
    ];

    /// The stored (and CLI) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Disconnected => "disconnected",
            Self::Rejected => "rejected",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// True for the states that end a connection row for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Disconnected | Self::Rejected)
    }

    /// The proto enum value.
    pub fn to_proto(self) -> pb::ConnectionState {
        match self {
            Self::Pending => pb::ConnectionState::Pending,
            Self::Active => pb::ConnectionState::Active,
            Self::Suspended => pb::ConnectionState::Suspended,
            Self::Disconnected => pb::ConnectionState::Disconnected,
            Self::Rejected => pb::ConnectionState::Rejected,
        }
    }

    /// From the proto enum; `None` for UNSPECIFIED.
    pub fn from_proto(state: pb::ConnectionState) -> Option<Self> {
        match state {
            pb::ConnectionState::Unspecified => None,
            pb::ConnectionState::Pending => Some(Self::Pending),
            pb::ConnectionState::Active => Some(Self::Active),
            pb::ConnectionState::Suspended => Some(Self::Suspended),
            pb::ConnectionState::Disconnected => Some(Self::Disconnected),
            pb::ConnectionState::Rejected => Some(Self::Rejected),
        }
    }
}

/// Who asked for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The peer asked this instance.
    Inbound,
    /// This instance asked the peer.
    Outbound,
}

impl Direction {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "inbound" => Some(Self::Inbound),
            "outbound" => Some(Self::Outbound),
            _ => None,
        }
    }

    /// The proto enum value.
    pub fn to_proto(self) -> pb::ConnectionDirection {
        match self {
            Self::Inbound => pb::ConnectionDirection::Inbound,
            Self::Outbound => pb::ConnectionDirection::Outbound,
        }
    }
}

/// Who caused a state change, as recorded in the connection's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// An operator of this instance.
    Local,
    /// A request, reply or notice from the peer.
    Peer,
    /// The daemon itself (e.g. an auto-accept).
    System,
}

impl Actor {
    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "local" => Some(Self::Local),
            "peer" => Some(Self::Peer),
            "system" => Some(Self::System),
            _ => None,
        }
    }

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::System => "system",
        }
    }
}

/// What an operator of this instance does to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    /// Accept an inbound pending request.
    Accept,
    /// Refuse an inbound pending request.
    Reject,
    /// Pause an active connection.
    Suspend,
    /// Resume a connection this instance suspended.
    Resume,
    /// End the connection for good.
    Disconnect,
}

/// A notice the peer sends about a connection change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoticeKind {
    /// The peer accepted our pending request.
    Accepted,
    /// The peer refused our pending request.
    Rejected,
    /// The peer suspended the connection.
    Suspended,
    /// The peer resumed the connection it had suspended.
    Resumed,
    /// The peer ended the connection.
    Disconnected,
    /// The peer rotated its key.
    KeyRotated,
}

impl NoticeKind {
    /// Every kind, for parsing.
    pub const ALL: [NoticeKind; 6] = [
        Self::Accepted,
        Self::Rejected,
        Self::Suspended,
        Self::Resumed,
        Self::Disconnected,
        Self::KeyRotated,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Suspended => "suspended",
            Self::Resumed => "resumed",
            Self::Disconnected => "disconnected",
            Self::KeyRotated => "key_rotated",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// The proto enum value.
    pub fn to_proto(self) -> pb::NoticeKind {
        match self {
            Self::Accepted => pb::NoticeKind::Accepted,
            Self::Rejected => pb::NoticeKind::Rejected,
            Self::Suspended => pb::NoticeKind::Suspended,
            Self::Resumed => pb::NoticeKind::Resumed,
            Self::Disconnected => pb::NoticeKind::Disconnected,
            Self::KeyRotated => pb::NoticeKind::KeyRotated,
        }
    }

    /// From the proto enum; `None` for UNSPECIFIED.
    pub fn from_proto(kind: pb::NoticeKind) -> Option<Self> {
        match kind {
            pb::NoticeKind::Unspecified => None,
            pb::NoticeKind::Accepted => Some(Self::Accepted),
            pb::NoticeKind::Rejected => Some(Self::Rejected),
            pb::NoticeKind::Suspended => Some(Self::Suspended),
            pb::NoticeKind::Resumed => Some(Self::Resumed),
            pb::NoticeKind::Disconnected => Some(Self::Disconnected),
            pb::NoticeKind::KeyRotated => Some(Self::KeyRotated),
        }
    }
}

/// The facts about a connection that decide which changes are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Situation {
    /// Current state.
    pub state: ConnectionState,
    /// Who asked for it.
    pub direction: Direction,
    /// While SUSPENDED: who suspended it.
    pub suspended_by: Option<Actor>,
}

/// Where a change leads: the new state and who is then recorded as suspender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The state after the change.
    pub state: ConnectionState,
    /// Who suspended it, when the new state is SUSPENDED.
    pub suspended_by: Option<Actor>,
    /// The notice the peer must be sent about it.
    pub notice: NoticeKind,
}

/// The new state after an operator action, or why the action does not apply
/// (a FAILED_PRECONDITION message).
pub fn after_operator_action(
    action: OperatorAction,
    situation: Situation,
) -> Result<Outcome, String> {
    use ConnectionState::{Active, Disconnected, Pending, Rejected, Suspended};
    let state = situation.state;
    let outcome = |state, suspended_by, notice| Outcome {
        state,
        suspended_by,
        notice,
    };
    match action {
        OperatorAction::Accept | OperatorAction::Reject => {
            if state != Pending || situation.direction != Direction::Inbound {
                return Err(format!(
                    "only an inbound pending connection can be accepted or rejected; this one is {} {}",
                    situation.direction.as_str(),
                    state.as_str()
                ));
            }
            Ok(if action == OperatorAction::Accept {
                outcome(Active, None, NoticeKind::Accepted)
            } else {
                outcome(Rejected, None, NoticeKind::Rejected)
            })
        }
        OperatorAction::Suspend => {
            if state != Active {
                return Err(format!(
                    "only an active connection can be suspended; this one is {}",
                    state.as_str()
                ));
            }
            Ok(outcome(
                Suspended,
                Some(Actor::Local),
                NoticeKind::Suspended,
            ))
        }
        OperatorAction::Resume => match (state, situation.suspended_by) {
            (Suspended, Some(Actor::Local)) => Ok(outcome(Active, None, NoticeKind::Resumed)),
            (Suspended, _) => Err(
                "the peer suspended this connection: only the side that suspended may resume"
                    .to_owned(),
            ),
            _ => Err(format!(
                "only a suspended connection can be resumed; this one is {}",
                state.as_str()
            )),
        },
        OperatorAction::Disconnect => {
            if state.is_terminal() {
                return Err(format!(
                    "the connection is already {}; connect again to make a new one",
                    state.as_str()
                ));
            }
            Ok(outcome(Disconnected, None, NoticeKind::Disconnected))
        }
    }
}

/// The new state after a notice from the peer (`KeyRotated` keeps the state), or
/// why the notice does not apply (a FAILED_PRECONDITION message).
pub fn after_notice(kind: NoticeKind, situation: Situation) -> Result<Outcome, String> {
    use ConnectionState::{Active, Disconnected, Pending, Rejected, Suspended};
    let state = situation.state;
    let outcome = |state, suspended_by| Outcome {
        state,
        suspended_by,
        notice: kind,
    };
    if state.is_terminal() {
        return Err(format!("the connection is already {}", state.as_str()));
    }
    match kind {
        NoticeKind::Accepted | NoticeKind::Rejected => {
            if state != Pending || situation.direction != Direction::Outbound {
                return Err(format!(
                    "{} applies only to an outbound pending connection; this one is {} {}",
                    kind.as_str(),
                    situation.direction.as_str(),
                    state.as_str()
                ));
            }
            Ok(if kind == NoticeKind::Accepted {
                outcome(Active, None)
            } else {
                outcome(Rejected, None)
            })
        }
        NoticeKind::Suspended => {
            if state != Active {
                return Err(format!(
                    "suspended applies only to an active connection; this one is {}",
                    state.as_str()
                ));
            }
            Ok(outcome(Suspended, Some(Actor::Peer)))
        }
        NoticeKind::Resumed => match (state, situation.suspended_by) {
            (Suspended, Some(Actor::Peer)) => Ok(outcome(Active, None)),
            _ => Err("resumed applies only to a connection the peer suspended".to_owned()),
        },
        NoticeKind::Disconnected => Ok(outcome(Disconnected, None)),
        NoticeKind::KeyRotated => Ok(Outcome {
            state,
            suspended_by: situation.suspended_by,
            notice: kind,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn situation(state: ConnectionState, direction: Direction) -> Situation {
        Situation {
            state,
            direction,
            suspended_by: None,
        }
    }

    #[test]
    fn only_inbound_pending_connections_are_accepted_or_rejected() {
        let inbound = situation(ConnectionState::Pending, Direction::Inbound);
        assert_eq!(
            after_operator_action(OperatorAction::Accept, inbound)
                .expect("accept")
                .state,
            ConnectionState::Active
        );
        assert_eq!(
            after_operator_action(OperatorAction::Reject, inbound)
                .expect("reject")
                .state,
            ConnectionState::Rejected
        );
        let outbound = situation(ConnectionState::Pending, Direction::Outbound);
        assert!(after_operator_action(OperatorAction::Accept, outbound).is_err());
        let active = situation(ConnectionState::Active, Direction::Inbound);
        assert!(after_operator_action(OperatorAction::Accept, active).is_err());
    }

    #[test]
    fn only_the_side_that_suspended_may_resume() {
        let suspended_here = Situation {
            state: ConnectionState::Suspended,
            direction: Direction::Outbound,
            suspended_by: Some(Actor::Local),
        };
        assert_eq!(
            after_operator_action(OperatorAction::Resume, suspended_here)
                .expect("resume")
                .state,
            ConnectionState::Active
        );
        let suspended_by_peer = Situation {
            suspended_by: Some(Actor::Peer),
            ..suspended_here
        };
        assert!(after_operator_action(OperatorAction::Resume, suspended_by_peer).is_err());
        assert_eq!(
            after_notice(NoticeKind::Resumed, suspended_by_peer)
                .expect("peer resumes")
                .state,
            ConnectionState::Active
        );
        assert!(after_notice(NoticeKind::Resumed, suspended_here).is_err());
    }

    #[test]
    fn terminal_states_accept_no_change() {
        for state in [ConnectionState::Disconnected, ConnectionState::Rejected] {
            let ended = situation(state, Direction::Inbound);
            for action in [
                OperatorAction::Accept,
                OperatorAction::Reject,
                OperatorAction::Suspend,
                OperatorAction::Resume,
                OperatorAction::Disconnect,
            ] {
                assert!(after_operator_action(action, ended).is_err(), "{action:?}");
            }
            for kind in NoticeKind::ALL {
                assert!(after_notice(kind, ended).is_err(), "{kind:?}");
            }
        }
    }

    #[test]
    fn suspend_needs_active_and_disconnect_works_from_any_open_state() {
        let pending = situation(ConnectionState::Pending, Direction::Outbound);
        assert!(after_operator_action(OperatorAction::Suspend, pending).is_err());
        assert!(after_notice(NoticeKind::Suspended, pending).is_err());
        for state in [
            ConnectionState::Pending,
            ConnectionState::Active,
            ConnectionState::Suspended,
        ] {
            let open = situation(state, Direction::Inbound);
            assert_eq!(
                after_operator_action(OperatorAction::Disconnect, open)
                    .expect("disconnect")
                    .state,
                ConnectionState::Disconnected
            );
            assert_eq!(
                after_notice(NoticeKind::Disconnected, open)
                    .expect("disconnected")
                    .state,
                ConnectionState::Disconnected
            );
        }
    }

    #[test]
    fn accepted_notices_apply_only_to_outbound_pending() {
        let outbound = situation(ConnectionState::Pending, Direction::Outbound);
        assert_eq!(
            after_notice(NoticeKind::Accepted, outbound)
                .expect("accepted")
                .state,
            ConnectionState::Active
        );
        let inbound = situation(ConnectionState::Pending, Direction::Inbound);
        assert!(after_notice(NoticeKind::Accepted, inbound).is_err());
    }

    #[test]
    fn spellings_round_trip() {
        for state in ConnectionState::ALL {
            assert_eq!(ConnectionState::parse(state.as_str()), Some(state));
            assert_eq!(ConnectionState::from_proto(state.to_proto()), Some(state));
        }
        for kind in NoticeKind::ALL {
            assert_eq!(NoticeKind::parse(kind.as_str()), Some(kind));
            assert_eq!(NoticeKind::from_proto(kind.to_proto()), Some(kind));
        }
    }
}
