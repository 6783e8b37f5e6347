//! Tests of the job engine: checks, guarded writes, watch feeds and idempotency.

use super::*;
use crate::coordinator::state::JobState;
use crate::store::testing::test_on_both_backends;

fn jobs_on(store: Store) -> Jobs {
    let config = CoordinatorConfig {
        max_payload_bytes: crate::config::DEFAULT_MAX_PAYLOAD_BYTES,
        remote_agent_poll: Duration::from_secs(2),
        webhooks: BTreeMap::new(),
    };
    Jobs::new(store, &CoordinatorState::default(), &config)
}

fn review() -> NewJob {
    NewJob {
        job_type: "review".to_owned(),
        ..NewJob::default()
    }
}

async fn concurrent_lifecycles_are_each_committed_with_their_history(store: Store) {
    let jobs = jobs_on(store.clone());
    let lifecycles = (0..24).map(|index| {
        let jobs = jobs.clone();
        tokio::spawn(async move {
            let mut new_job = review();
            new_job.idempotency_key = format!("key-{}", index % 12);
            let (job, _) = jobs.create(new_job, "bot").await.expect("create");
            // Half the creates reuse a key: both callers get the same
            // job, and one of them loses the race to start it.
            let started = jobs
                .change(
                    &job.id,
                    JobChange::Start {
                        message: String::new(),
                    },
                    "bot",
                )
                .await;
            (job.id, started.is_ok())
        })
    });
    let mut starts = BTreeMap::<String, usize>::new();
    for lifecycle in lifecycles.collect::<Vec<_>>() {
        let (id, started) = lifecycle.await.expect("join");
        *starts.entry(id).or_default() += usize::from(started);
    }
    assert_eq!(starts.len(), 12, "one job per key");
    for (id, started) in starts {
        assert_eq!(started, 1, "{id} was started once");
        let job = jobs.get(&id).await.expect("get");
        assert_eq!((job.state, job.version), (JobState::Running, 2));
        assert_eq!(jobs.history(&id).await.expect("history").len(), 2);
    }
}

async fn a_write_that_fails_fails_only_its_own_call(store: Store) {
    let jobs = jobs_on(store.clone());
    let (a, _) = jobs.create(review(), "bot").await.expect("create");
    let mut clash = state::creation_entry(&a, "bot");
    clash.sequence = 2;
    store.plant_job_history(&clash).await.expect("plant");

    let b = JobRecord::new_pending(new_job_id(), "review".to_owned(), now_ms());
    let b_id = b.id.clone();
    let start = JobChange::Start {
        message: String::new(),
    };
    let guard = JobGuard {
        job_id: &a.id,
        state: JobState::Pending,
        version: None,
    };
    let answers = write_batch(
        &store,
        vec![
            JobWriteOp::Insert {
                creation: state::creation_entry(&b, "bot"),
                job: b,
            },
            JobWriteOp::change(&guard, state::write_of(&start, "bot", now_ms())),
        ],
    )
    .await;
    assert!(
        matches!(answers[0], Ok(JobWritten::Inserted(true))),
        "{answers:?}"
    );
    assert!(
        matches!(answers[1], Err(StoreError::Conflict(_))),
        "{answers:?}"
    );
    assert_eq!(jobs.get(&b_id).await.expect("b").state, JobState::Pending);
    assert_eq!(jobs.get(&a.id).await.expect("a").version, 1);
}

test_on_both_backends!(
    concurrent_lifecycles_are_each_committed_with_their_history,
    a_write_that_fails_fails_only_its_own_call,
);

fn valid() -> NewJob {
    NewJob {
        job_type: "review".to_owned(),
        payload_json: "{\"pr\":1}".to_owned(),
        ..NewJob::default()
    }
}

fn refused(new_job: NewJob) -> String {
    match validate_new_job(&new_job, 1024) {
        Err(CoordinatorError::Invalid(message)) => message,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn a_well_formed_job_is_accepted() {
    assert!(validate_new_job(&valid(), 1024).is_ok());
    assert!(
        validate_new_job(
            &NewJob {
                payload_json: String::new(),
                ..valid()
            },
            1024
        )
        .is_ok()
    );
}

#[test]
fn malformed_jobs_are_refused_with_the_field_named() {
    assert!(
        refused(NewJob {
            job_type: " ".to_owned(),
            ..valid()
        })
        .contains("job_type")
    );
    assert!(
        refused(NewJob {
            payload_json: "{not json".to_owned(),
            ..valid()
        })
        .contains("payload_json")
    );
    assert!(
        refused(NewJob {
            payload_json: format!("\"{}\"", "x".repeat(2000)),
            ..valid()
        })
        .contains("max_payload_bytes")
    );
    assert!(
        refused(NewJob {
            labels: [(String::new(), "v".to_owned())].into(),
            ..valid()
        })
        .contains("label")
    );
    assert!(
        refused(NewJob {
            labels: (0..40).map(|i| (format!("k{i}"), String::new())).collect(),
            ..valid()
        })
        .contains("labels")
    );
    assert!(
        refused(NewJob {
            job_type: "a\u{0}b".to_owned(),
            ..valid()
        })
        .contains("control")
    );
}

#[test]
fn every_control_character_is_refused_in_a_job_id_and_other_text_is_not() {
    // C0, DEL and C1 (a terminal's CSI is U+009B), alone and beside text
    // beyond ASCII.
    for job_id in ["a\u{1}b", "ab\u{7f}", "\u{9b}31m", "é\u{85}", "\u{1b}[2J"] {
        match validate_job_id(job_id) {
            Err(CoordinatorError::Invalid(message)) => {
                assert!(message.contains("control"), "{job_id:?}: {message}");
            }
            other => panic!("{job_id:?}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    for job_id in [
        "01a24f22-465d-728d-b92e-f2dfcd3769e9",
        "tâche-№7",
        "\u{a0}x\u{2028}",
    ] {
        assert!(validate_job_id(job_id).is_ok(), "{job_id:?}");
    }
}

#[test]
fn results_must_be_json_and_messages_bounded() {
    assert!(
        validate_change(
            &JobChange::Complete {
                result_json: "nope".to_owned()
            },
            1024
        )
        .is_err()
    );
    assert!(
        validate_change(
            &JobChange::Fail {
                error: "x".repeat(MAX_MESSAGE + 1)
            },
            1024
        )
        .is_err()
    );
    assert!(
        validate_change(
            &JobChange::Fail {
                error: "line one\nline two".to_owned()
            },
            1024
        )
        .is_ok()
    );
}
