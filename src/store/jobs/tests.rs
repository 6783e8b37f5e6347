//! Tests of the job queries, on both backends.

use super::*;
use crate::coordinator::state::{JobChange, apply, creation_entry, write_of};
use crate::store::testing::test_on_both_backends;

fn guarded(job_id: &str, state: JobState, version: Option<i64>) -> JobGuard<'_> {
    JobGuard {
        job_id,
        state,
        version,
    }
}

fn job(id: &str, created_at_ms: i64) -> JobRecord {
    let mut job = JobRecord::new_pending(id.to_owned(), "review".to_owned(), created_at_ms);
    job.labels.insert("repo".to_owned(), "mosaic".to_owned());
    job.workspace = "w1".to_owned();
    job
}

async fn insert(store: &Store, job: &JobRecord) {
    store
        .insert_job(job, &creation_entry(job, "tester"))
        .await
        .expect("insert job");
}

async fn a_job_round_trips_with_its_history(store: Store) {
    let mut created = job("a", 1_000);
    created.idempotency_key = Some("key-1".to_owned());
    created.payload_json = "{\"x\":1}".to_owned();
    insert(&store, &created).await;
    assert_eq!(
        store.find_job("a").await.expect("find"),
        Some(created.clone())
    );
    assert_eq!(
        store
            .find_job_by_idempotency_key("key-1")
            .await
            .expect("find by key"),
        Some(created.clone())
    );
    let start = JobChange::Start {
        message: "go".to_owned(),
    };
    let (started, entry) = apply(&created, &start, "worker", 2_000).expect("legal");
    let written = store
        .write_job_change(
            &guarded("a", JobState::Pending, Some(1)),
            &write_of(&start, "worker", 2_000),
        )
        .await
        .expect("update");
    assert_eq!(written, Some(started.clone()));
    assert_eq!(store.find_job("a").await.expect("find"), Some(started));
    let history = store.job_history("a", 0).await.expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[1], entry);
    assert_eq!(store.job_history("a", 1).await.expect("after 1").len(), 1);
}

async fn a_stale_version_writes_nothing(store: Store) {
    let created = job("a", 1_000);
    insert(&store, &created).await;
    let start = write_of(
        &JobChange::Start {
            message: String::new(),
        },
        "worker",
        2_000,
    );
    for guard in [
        guarded("a", JobState::Pending, Some(7)),
        guarded("a", JobState::Running, Some(1)),
        guarded("a", JobState::Running, None),
        guarded("missing", JobState::Pending, None),
    ] {
        let written = store
            .write_job_change(&guard, &start)
            .await
            .expect("update");
        assert_eq!(written, None, "{guard:?}");
    }
    assert_eq!(store.find_job("a").await.expect("find"), Some(created));
    assert_eq!(store.job_history("a", 0).await.expect("history").len(), 1);
}

async fn a_change_guarded_by_state_alone_is_written_with_its_entry(store: Store) {
    let created = job("a", 1_000);
    insert(&store, &created).await;
    let start = JobChange::Start {
        message: "go".to_owned(),
    };
    let complete = JobChange::Complete {
        result_json: "{\"ok\":true}".to_owned(),
    };
    let (started, start_entry) = apply(&created, &start, "worker", 2_000).expect("legal");
    let (completed, complete_entry) = apply(&started, &complete, "worker", 3_000).expect("legal");
    for (from, change, at_ms, expected) in [
        (JobState::Pending, &start, 2_000, &started),
        (JobState::Running, &complete, 3_000, &completed),
    ] {
        let written = store
            .write_job_change(
                &guarded("a", from, None),
                &write_of(change, "worker", at_ms),
            )
            .await
            .expect("update");
        assert_eq!(written.as_ref(), Some(expected));
    }
    // The same complete again matches no RUNNING job: nothing is written.
    let again = store
        .write_job_change(
            &guarded("a", JobState::Running, None),
            &write_of(&complete, "worker", 4_000),
        )
        .await
        .expect("update");
    assert_eq!(again, None);
    assert_eq!(
        store.job_history("a", 0).await.expect("history"),
        vec![
            creation_entry(&created, "tester"),
            start_entry,
            complete_entry
        ]
    );
}

async fn of_racing_changes_guarded_by_state_exactly_one_is_written(store: Store) {
    let created = job("a", 1_000);
    insert(&store, &created).await;
    let start = write_of(
        &JobChange::Start {
            message: String::new(),
        },
        "worker",
        2_000,
    );
    let racers = (0..8).map(|index| {
        let store = store.clone();
        let start = start.clone();
        tokio::spawn(async move {
            let written = store
                .write_job_change(&guarded("a", JobState::Pending, None), &start)
                .await
                .expect("update");
            (index, written.is_some())
        })
    });
    let mut winners = Vec::new();
    for racer in racers.collect::<Vec<_>>() {
        let (index, won) = racer.await.expect("join");
        if won {
            winners.push(index);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(store.job_history("a", 0).await.expect("history").len(), 2);
}

async fn a_reused_idempotency_key_conflicts(store: Store) {
    let mut first = job("a", 1_000);
    first.idempotency_key = Some("same".to_owned());
    insert(&store, &first).await;
    let mut second = job("b", 2_000);
    second.idempotency_key = Some("same".to_owned());
    let outcome = store
        .insert_job(&second, &creation_entry(&second, "tester"))
        .await;
    assert!(
        matches!(outcome, Err(StoreError::Conflict(_))),
        "{outcome:?}"
    );
    assert_eq!(store.find_job("b").await.expect("find"), None);
    // Jobs without a key never conflict with each other.
    insert(&store, &job("c", 3_000)).await;
    insert(&store, &job("d", 3_000)).await;
}

async fn lists_filter_and_page_newest_first(store: Store) {
    for (index, id) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
        let mut created = job(id, 1_000 + i64::try_from(index).expect("small"));
        if id == "c" {
            created.labels.insert("team".to_owned(), "red".to_owned());
            created.job_type = "deploy".to_owned();
        }
        insert(&store, &created).await;
    }
    let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|job| job.id).collect::<Vec<_>>();
    let everything = JobFilter::default();
    let first = store.list_jobs(&everything, None, 2).await.expect("list");
    assert_eq!(ids(first.clone()), ["e", "d"]);
    let cursor = JobCursor {
        created_at_ms: first[1].created_at_ms,
        id: first[1].id.clone(),
    };
    let second = store
        .list_jobs(&everything, Some(&cursor), 10)
        .await
        .expect("list");
    assert_eq!(ids(second), ["c", "b", "a"]);

    let labelled = JobFilter {
        labels: [("team".to_owned(), "red".to_owned())].into(),
        ..JobFilter::default()
    };
    assert_eq!(
        ids(store.list_jobs(&labelled, None, 10).await.expect("list")),
        ["c"]
    );
    let typed = JobFilter {
        job_type: Some("review".to_owned()),
        state: Some(JobState::Pending),
        workspace: Some("w1".to_owned()),
        ..JobFilter::default()
    };
    assert_eq!(
        ids(store.list_jobs(&typed, None, 10).await.expect("list")),
        ["e", "d", "b", "a"]
    );
    let none = JobFilter {
        state: Some(JobState::Running),
        ..JobFilter::default()
    };
    assert!(
        store
            .list_jobs(&none, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
}

async fn a_webhook_delivery_is_recorded_once(store: Store) {
    let first = job("a", 1_000);
    let outcome = store
        .record_webhook_delivery(
            "github",
            "delivery-1",
            Some((&first, &creation_entry(&first, "webhook:github"))),
            1_000,
        )
        .await
        .expect("record");
    assert_eq!(outcome, DeliveryOutcome::Recorded);
    let again = job("b", 2_000);
    let outcome = store
        .record_webhook_delivery(
            "github",
            "delivery-1",
            Some((&again, &creation_entry(&again, "webhook:github"))),
            2_000,
        )
        .await
        .expect("record");
    assert_eq!(
        outcome,
        DeliveryOutcome::Duplicate {
            job_id: Some("a".to_owned())
        }
    );
    assert_eq!(store.find_job("b").await.expect("find"), None);
    // The same id from another source is another delivery; an ignored
    // event is remembered without a job.
    let outcome = store
        .record_webhook_delivery("gitlab", "delivery-1", None, 3_000)
        .await
        .expect("record");
    assert_eq!(outcome, DeliveryOutcome::Recorded);
    let outcome = store
        .record_webhook_delivery("gitlab", "delivery-1", None, 3_000)
        .await
        .expect("record");
    assert_eq!(outcome, DeliveryOutcome::Duplicate { job_id: None });
}

fn delivery_of(delivery_id: &str, job: Option<&JobRecord>) -> JobWriteOp {
    JobWriteOp::Delivery {
        source: "github".to_owned(),
        delivery_id: delivery_id.to_owned(),
        job: job.map(|job| Box::new((job.clone(), creation_entry(job, "webhook:github")))),
        received_at_ms: 1_000,
    }
}

/// Deliveries go through the same batches as the other job writes: a
/// delivery repeated within one batch is written once, one without an id
/// is not deduplicated, and each job is written with its labels and entry.
async fn deliveries_in_one_batch_are_written_once_each(store: Store) {
    let (x, y, z, w) = (
        job("x", 1_000),
        job("y", 1_000),
        job("z", 1_000),
        job("w", 1_000),
    );
    let written = store
        .write_jobs(Arc::from([
            delivery_of("d-1", Some(&x)),
            delivery_of("d-1", Some(&y)),
            delivery_of("", Some(&z)),
            delivery_of("d-2", None),
            insert_of(&w),
        ]))
        .await
        .expect("write the batch");
    assert_eq!(
        written,
        vec![
            JobWritten::Delivered(DeliveryOutcome::Recorded),
            JobWritten::Delivered(DeliveryOutcome::Duplicate {
                job_id: Some("x".to_owned())
            }),
            JobWritten::Delivered(DeliveryOutcome::Recorded),
            JobWritten::Delivered(DeliveryOutcome::Recorded),
            JobWritten::Inserted(true),
        ]
    );
    for kept in [&x, &z, &w] {
        assert_eq!(
            store.find_job(&kept.id).await.expect("find").as_ref(),
            Some(kept)
        );
        assert_eq!(
            store.job_history(&kept.id, 0).await.expect("history").len(),
            1
        );
    }
    assert_eq!(store.find_job("y").await.expect("find"), None);
    assert_eq!(
        store
            .record_webhook_delivery("github", "d-2", None, 2_000)
            .await
            .expect("record"),
        DeliveryOutcome::Duplicate { job_id: None }
    );
}

fn start_of(job_id: &str, at_ms: i64) -> JobWriteOp {
    let start = JobChange::Start {
        message: String::new(),
    };
    JobWriteOp::change(
        &guarded(job_id, JobState::Pending, None),
        write_of(&start, "worker", at_ms),
    )
}

fn insert_of(job: &JobRecord) -> JobWriteOp {
    JobWriteOp::Insert {
        job: job.clone(),
        creation: creation_entry(job, "tester"),
    }
}

fn state_of(written: &JobWritten) -> Option<JobState> {
    match written {
        JobWritten::Changed(job) => job.as_ref().map(|job| job.state),
        JobWritten::Inserted(_) | JobWritten::Delivered(_) => None,
    }
}

async fn a_batch_is_written_in_order_with_an_answer_each(store: Store) {
    insert(&store, &job("a", 1_000)).await;
    let mut b = job("b", 2_000);
    b.idempotency_key = Some("k".to_owned());
    let mut c = job("c", 3_000);
    c.idempotency_key = Some("k".to_owned());
    let written = store
        .write_jobs(Arc::from([
            insert_of(&b),
            start_of("a", 4_000),
            // a has just moved on, in this same batch.
            start_of("a", 4_001),
            // b's key is taken, by this same batch.
            insert_of(&c),
            // b exists: it was written earlier in this batch.
            start_of("b", 4_002),
        ]))
        .await
        .expect("batch");
    assert_eq!(written.len(), 5);
    assert_eq!(written[0], JobWritten::Inserted(true));
    assert_eq!(state_of(&written[1]), Some(JobState::Running));
    assert_eq!(written[2], JobWritten::Changed(None));
    assert_eq!(written[3], JobWritten::Inserted(false));
    assert_eq!(state_of(&written[4]), Some(JobState::Running));

    assert_eq!(store.find_job("c").await.expect("find"), None);
    for id in ["a", "b"] {
        let job = store.find_job(id).await.expect("find").expect("written");
        assert_eq!((job.state, job.version), (JobState::Running, 2), "{id}");
        assert_eq!(store.job_history(id, 0).await.expect("history").len(), 2);
    }
}

/// A batch of writes to distinct jobs, each kind of write in it: every
/// row comes out as if it had been written alone.
async fn a_batch_of_writes_to_distinct_jobs_writes_every_row(store: Store) {
    let mut running = job("running", 1_000);
    running.idempotency_key = Some("taken".to_owned());
    insert(&store, &running).await;
    let running = store
        .write_job_change(
            &guarded("running", JobState::Pending, None),
            &write_of(
                &JobChange::Start {
                    message: String::new(),
                },
                "worker",
                1_500,
            ),
        )
        .await
        .expect("start")
        .expect("started");
    insert(&store, &job("pending", 1_100)).await;

    let mut fresh = job("fresh", 2_000);
    fresh.labels.insert("team".to_owned(), "red".to_owned());
    fresh.idempotency_key = Some("new-key".to_owned());
    fresh.payload_json = "{\"x\":1}".to_owned();
    let mut reused = job("reused", 2_001);
    reused.idempotency_key = Some("taken".to_owned());
    let progress = JobChange::Progress {
        percent: Percent::new(40).expect("percent"),
        message: "halfway".to_owned(),
    };
    let fail = JobChange::Fail {
        error: "no disk".to_owned(),
    };
    let written = store
        .write_jobs(Arc::from([
            JobWriteOp::change(
                &guarded("running", JobState::Running, Some(running.version)),
                write_of(&progress, "worker", 3_000),
            ),
            insert_of(&fresh),
            JobWriteOp::change(
                &guarded("pending", JobState::Pending, None),
                write_of(&fail, "bot", 3_001),
            ),
            // A guard that matches no job, a key another job has.
            start_of("missing", 3_002),
            insert_of(&reused),
        ]))
        .await
        .expect("batch");

    let progressed = store.find_job("running").await.expect("find").expect("job");
    assert_eq!(
        written[0],
        JobWritten::Changed(Some(Box::new(progressed.clone())))
    );
    assert_eq!(
        (
            progressed.progress.get(),
            progressed.progress_message.as_str()
        ),
        (40, "halfway")
    );
    assert_eq!(written[1], JobWritten::Inserted(true));
    assert_eq!(
        store.find_job("fresh").await.expect("find"),
        Some(fresh.clone())
    );
    let failed = store.find_job("pending").await.expect("find").expect("job");
    assert_eq!(
        written[2],
        JobWritten::Changed(Some(Box::new(failed.clone())))
    );
    assert_eq!(
        (failed.state, failed.error.as_str()),
        (JobState::Failed, "no disk")
    );
    assert_eq!(written[3], JobWritten::Changed(None));
    assert_eq!(written[4], JobWritten::Inserted(false));
    assert_eq!(written.len(), 5);
    assert_eq!(store.find_job("reused").await.expect("find"), None);
    assert_eq!(store.find_job("missing").await.expect("find"), None);

    // The new job's label rows and creation entry, the changes' entries.
    let labelled = JobFilter {
        labels: [("team".to_owned(), "red".to_owned())].into(),
        ..JobFilter::default()
    };
    assert_eq!(
        store.list_jobs(&labelled, None, 10).await.expect("list"),
        [fresh.clone()]
    );
    assert_eq!(
        store.job_history("fresh", 0).await.expect("history"),
        [creation_entry(&fresh, "tester")]
    );
    let last = |history: Vec<JobHistoryRecord>| history.last().cloned().expect("entry");
    let entry = last(store.job_history("running", 0).await.expect("history"));
    assert_eq!(
        (
            entry.sequence,
            entry.from_state,
            entry.to_state,
            entry.message.as_str()
        ),
        (3, Some(JobState::Running), JobState::Running, "halfway")
    );
    let entry = last(store.job_history("pending", 0).await.expect("history"));
    assert_eq!(
        (
            entry.sequence,
            entry.from_state,
            entry.to_state,
            entry.actor.as_str()
        ),
        (2, Some(JobState::Pending), JobState::Failed, "bot")
    );
    assert_eq!(entry.at_ms, 3_001);
}

async fn a_batch_with_a_failing_write_writes_nothing(store: Store) {
    let a = job("a", 1_000);
    insert(&store, &a).await;
    let mut clash = creation_entry(&a, "tester");
    clash.sequence = 2;
    store.plant_job_history(&clash).await.expect("plant");

    let outcome = store
        .write_jobs(Arc::from([
            insert_of(&job("b", 2_000)),
            start_of("a", 3_000),
        ]))
        .await;
    assert!(
        matches!(outcome, Err(StoreError::Conflict(_))),
        "{outcome:?}"
    );
    assert_eq!(store.find_job("b").await.expect("find"), None);
    assert_eq!(store.find_job("a").await.expect("find"), Some(a));
    // Alone, the other write goes through.
    assert_eq!(
        store
            .write_job(insert_of(&job("b", 2_000)))
            .await
            .expect("alone"),
        JobWritten::Inserted(true)
    );
}

/// Every column read back into its own field: on PostgreSQL the reads by id
/// and by idempotency key decode the row by column position
/// (`postgres.rs`), so two columns swapped would show here.
async fn a_job_reads_back_every_field_by_id_and_by_key(store: Store) {
    let mut stored = job("every-field", 1_000);
    stored.payload_json = "{\"payload\":1}".to_owned();
    stored.priority = 7;
    stored.state = JobState::Failed;
    stored.progress = Percent::new(42).expect("a percentage");
    stored.progress_message = "progress message".to_owned();
    stored.result_json = "{\"result\":2}".to_owned();
    stored.error = "the error".to_owned();
    stored.created_by = "the creator".to_owned();
    stored.agent_id = "the agent".to_owned();
    stored.peer_instance_id = "the peer".to_owned();
    stored.idempotency_key = Some("the key".to_owned());
    stored.version = 3;
    stored.updated_at_ms = 2_000;
    stored.started_at_ms = Some(1_500);
    stored.ended_at_ms = Some(1_900);
    insert(&store, &stored).await;
    assert_eq!(
        store.find_job("every-field").await.expect("by id"),
        Some(stored.clone())
    );
    assert_eq!(
        store
            .find_job_by_idempotency_key("the key")
            .await
            .expect("by key"),
        Some(stored)
    );
    assert_eq!(store.find_job("no-such-job").await.expect("by id"), None);
    assert_eq!(
        store
            .find_job_by_idempotency_key("no such key")
            .await
            .expect("by key"),
        None
    );
}

test_on_both_backends!(
    a_job_reads_back_every_field_by_id_and_by_key,
    a_batch_is_written_in_order_with_an_answer_each,
    a_batch_of_writes_to_distinct_jobs_writes_every_row,
    a_batch_with_a_failing_write_writes_nothing,
    a_job_round_trips_with_its_history,
    a_stale_version_writes_nothing,
    a_change_guarded_by_state_alone_is_written_with_its_entry,
    of_racing_changes_guarded_by_state_exactly_one_is_written,
    a_reused_idempotency_key_conflicts,
    lists_filter_and_page_newest_first,
    a_webhook_delivery_is_recorded_once,
    deliveries_in_one_batch_are_written_once_each,
);
