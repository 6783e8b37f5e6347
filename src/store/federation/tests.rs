//! Tests of the federation queries, on both backends.

use super::*;
use crate::store::StoredReply;
use crate::store::testing::test_on_both_backends;

fn connection(id: &str, state: ConnectionState) -> ConnectionRecord {
    ConnectionRecord {
        id: id.to_owned(),
        workspace: "ws".to_owned(),
        remote_instance_id: "peer".to_owned(),
        remote_name: "peer".to_owned(),
        remote_url: "https://127.0.0.1:1".to_owned(),
        remote_public_key: vec![1, 2, 3],
        remote_fingerprint: "FP".to_owned(),
        capabilities: ConnectionCapabilities {
            remote: vec!["agent.spawn".to_owned()],
            ..ConnectionCapabilities::default()
        },
        direction: Direction::Inbound,
        state,
        state_reason: String::new(),
        suspended_by: None,
        reachable: true,
        last_contact_at_ms: None,
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
        request_source: Some("ip:127.0.0.1".to_owned()),
    }
}

fn created(id: &str) -> ConnectionEventRecord {
    ConnectionEventRecord {
        connection_id: id.to_owned(),
        from_state: None,
        to_state: ConnectionState::Pending,
        actor: Actor::Peer,
        reason: String::new(),
        at_ms: 1_000,
    }
}

fn seen(message_id: &str) -> SeenMessage {
    SeenMessage {
        sender_instance_id: "peer".to_owned(),
        message_id: message_id.to_owned(),
        payload_digest: vec![9; 32],
        reply: Some(StoredReply {
            payload: vec![1],
            signature: vec![2],
            key_id: "k".to_owned(),
        }),
        seen_at_ms: 1_000,
    }
}

fn notice(id: &str, connection_id: &str, kind: NoticeKind) -> NoticeRecord {
    NoticeRecord {
        id: id.to_owned(),
        connection_id: connection_id.to_owned(),
        kind,
        reason: String::new(),
        granted_capabilities: vec!["agent.status".to_owned()],
        signing_key_id: None,
        attempts: 0,
        next_attempt_at_ms: 1_000,
        last_error: String::new(),
        created_at_ms: 1_000,
    }
}

fn change(id: &str, from: ConnectionState, to: ConnectionState) -> ConnectionChange {
    ConnectionChange {
        connection_id: id.to_owned(),
        expected_state: from,
        new_state: to,
        state_reason: "why".to_owned(),
        suspended_by: None,
        capabilities: None,
        new_remote_key: None,
        retired_peer_key: None,
        event: Some(ConnectionEventRecord {
            from_state: Some(from),
            to_state: to,
            actor: Actor::Local,
            ..created(id)
        }),
        notice: Some(notice(
            &format!("{id}-notice"),
            id,
            NoticeKind::Disconnected,
        )),
        seen: None,
        at_ms: 2_000,
    }
}

async fn one_open_connection_per_peer_and_workspace(store: Store) {
    let first = connection("first", ConnectionState::Pending);
    assert_eq!(
        store
            .insert_connection(&first, &[created("first")], Some(&seen("m1")))
            .await
            .expect("insert"),
        WriteOutcome::Done(())
    );
    // The same message id again writes nothing, even for another row.
    assert_eq!(
        store
            .insert_connection(
                &connection("other", ConnectionState::Pending),
                &[created("other")],
                Some(&seen("m1"))
            )
            .await
            .expect("insert"),
        WriteOutcome::DuplicateMessage
    );
    assert_eq!(
        store
            .insert_connection(
                &connection("second", ConnectionState::Pending),
                &[created("second")],
                Some(&seen("m2"))
            )
            .await
            .expect("insert"),
        WriteOutcome::OpenConnectionExists
    );
    assert_eq!(
        store.find_seen_message("peer", "m2").await.expect("find"),
        None
    );
    assert_eq!(
        store.find_seen_message("peer", "m1").await.expect("find"),
        Some(seen("m1"))
    );
    // Once the first is terminal, a new connection may be made.
    let outcome = store
        .change_connection(&change(
            "first",
            ConnectionState::Pending,
            ConnectionState::Disconnected,
        ))
        .await
        .expect("change");
    let WriteOutcome::Done(ended) = outcome else {
        panic!("expected a change, got {outcome:?}");
    };
    assert_eq!(ended.state, ConnectionState::Disconnected);
    assert_eq!(ended.state_reason, "why");
    assert_eq!(
        store
            .insert_connection(
                &connection("second", ConnectionState::Pending),
                &[created("second")],
                None
            )
            .await
            .expect("insert"),
        WriteOutcome::Done(())
    );
    let open = store
        .find_open_connection("ws", "peer")
        .await
        .expect("find")
        .expect("open");
    assert_eq!(open.id, "second");
    assert_eq!(
        open.capabilities,
        connection("x", ConnectionState::Pending).capabilities
    );
    assert_eq!(
        store
            .connection_events("first")
            .await
            .expect("events")
            .len(),
        2
    );
}

async fn a_stale_change_writes_nothing(store: Store) {
    store
        .insert_connection(
            &connection("c", ConnectionState::Pending),
            &[created("c")],
            None,
        )
        .await
        .expect("insert");
    let outcome = store
        .change_connection(&change(
            "c",
            ConnectionState::Active,
            ConnectionState::Suspended,
        ))
        .await
        .expect("change");
    assert_eq!(outcome, WriteOutcome::StateChanged);
    assert_eq!(store.connection_events("c").await.expect("events").len(), 1);
    assert!(store.notices_of("c").await.expect("notices").is_empty());
    // A duplicate message id rolls the whole change back.
    store.insert_seen_message(&seen("dup")).await.expect("seen");
    let mut duplicate = change("c", ConnectionState::Pending, ConnectionState::Active);
    duplicate.seen = Some(seen("dup"));
    assert_eq!(
        store.change_connection(&duplicate).await.expect("change"),
        WriteOutcome::DuplicateMessage
    );
    let unchanged = store
        .find_connection("c")
        .await
        .expect("find")
        .expect("row");
    assert_eq!(unchanged.state, ConnectionState::Pending);
    assert!(store.notices_of("c").await.expect("notices").is_empty());
}

async fn notices_keep_their_order_and_are_counted(store: Store) {
    for id in ["a", "b"] {
        store
            .insert_connection(
                &ConnectionRecord {
                    workspace: id.to_owned(),
                    ..connection(id, ConnectionState::Active)
                },
                &[created(id)],
                None,
            )
            .await
            .expect("insert");
    }
    store
        .insert_notice(&notice("n1", "a", NoticeKind::Suspended))
        .await
        .expect("notice");
    store
        .insert_notice(&notice("n2", "a", NoticeKind::Resumed))
        .await
        .expect("notice");
    store
        .insert_notice(&notice("n3", "b", NoticeKind::KeyRotated))
        .await
        .expect("notice");
    let kinds: Vec<NoticeKind> = store
        .notices_of("a")
        .await
        .expect("notices")
        .into_iter()
        .map(|notice| notice.kind)
        .collect();
    assert_eq!(kinds, vec![NoticeKind::Suspended, NoticeKind::Resumed]);
    let counts = store
        .pending_notice_counts(&["a".to_owned(), "b".to_owned()])
        .await
        .expect("counts");
    assert_eq!(counts.get("a"), Some(&2));
    assert_eq!(counts.get("b"), Some(&1));
    store
        .reschedule_notice("n1", 1, 5_000, "down")
        .await
        .expect("reschedule");
    let mut due = store
        .connections_with_due_notices(1_000)
        .await
        .expect("due");
    due.sort();
    assert_eq!(due, vec!["a".to_owned(), "b".to_owned()]);
    store.delete_notice("n2").await.expect("delete");
    store.delete_notice("n3").await.expect("delete");
    assert!(
        store
            .connections_with_due_notices(1_000)
            .await
            .expect("due")
            .is_empty()
    );
    assert_eq!(
        store
            .connections_with_due_notices(5_000)
            .await
            .expect("due"),
        vec!["a".to_owned()]
    );
    let rescheduled = store.notices_of("a").await.expect("notices");
    assert_eq!(rescheduled[0].attempts, 1);
    assert_eq!(rescheduled[0].last_error, "down");
}

async fn old_message_ids_and_peer_keys_are_pruned(store: Store) {
    store
        .insert_connection(
            &connection("c", ConnectionState::Active),
            &[created("c")],
            None,
        )
        .await
        .expect("insert");
    let mut rotation = change("c", ConnectionState::Active, ConnectionState::Active);
    rotation.event = None;
    rotation.notice = None;
    rotation.new_remote_key = Some((vec![7, 7], "NEW".to_owned()));
    rotation.retired_peer_key = Some(PeerKeyRecord {
        connection_id: "c".to_owned(),
        key_id: "old".to_owned(),
        public_key: vec![1, 2, 3],
        valid_until_ms: 3_000,
    });
    let WriteOutcome::Done(rotated) = store.change_connection(&rotation).await.expect("rotate")
    else {
        panic!("rotation refused");
    };
    assert_eq!(rotated.remote_public_key, vec![7, 7]);
    assert_eq!(rotated.remote_fingerprint, "NEW");
    assert_eq!(store.peer_keys("c").await.expect("keys").len(), 1);
    store.insert_seen_message(&seen("old")).await.expect("seen");
    assert_eq!(
        store.insert_seen_message(&seen("old")).await.expect("seen"),
        WriteOutcome::DuplicateMessage
    );
    assert_eq!(
        store.prune_federation(1_001, 2_000).await.expect("prune"),
        1
    );
    assert_eq!(store.peer_keys("c").await.expect("keys").len(), 1);
    store.prune_federation(1_001, 3_001).await.expect("prune");
    assert!(store.peer_keys("c").await.expect("keys").is_empty());
    assert_eq!(
        store.find_seen_message("peer", "old").await.expect("find"),
        None
    );
}

test_on_both_backends!(
    one_open_connection_per_peer_and_workspace,
    a_stale_change_writes_nothing,
    notices_keep_their_order_and_are_counted,
    old_message_ids_and_peer_keys_are_pruned,
);
