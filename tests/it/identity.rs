//! Instance identity: created once, kept across restarts, sealed at rest, rotated.

use mosaic_mesh::auth::Scope;
use mosaic_mesh::identity::{MasterKey, PublicKey};
use mosaic_mesh::proto::federation as pb;
use mosaic_mesh::tls::ServerPin;

use crate::support::Backend;
use crate::support::daemon::{TestEnvironment, instance_of, with_key, with_master_key};

async fn restart_keeps_the_identity(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let before = instance_of(daemon.channel().await).await;
    daemon.stop().await;

    let daemon = environment.start().await;
    let after = instance_of(daemon.channel().await).await;
    assert_eq!(after.instance_id, before.instance_id);
    assert_eq!(after.public_key, before.public_key);
    assert_eq!(after.fingerprint, before.fingerprint);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_identity_on_sqlite() {
    restart_keeps_the_identity(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_identity_on_postgres() {
    restart_keeps_the_identity(Backend::Postgres).await;
}

async fn wrong_master_key_refuses_to_start_and_changes_nothing(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let before = instance_of(daemon.channel().await).await;
    daemon.stop().await;
    let store = environment.store().await;
    let (_, keys_before) = store
        .load_instance()
        .await
        .expect("load")
        .expect("identity");

    let wrong = MasterKey::generate().expect("key").to_base64();
    let config = with_master_key(environment.config(), &wrong);
    let error = match environment.start_with(config).await {
        Ok(_) => panic!("a wrong master key must not start the daemon"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("master key"), "{error}");
    assert!(
        !error.contains(wrong.as_str()),
        "the error must not echo the key"
    );

    let (_, keys_after) = store
        .load_instance()
        .await
        .expect("load")
        .expect("identity");
    assert_eq!(keys_after, keys_before, "nothing was written");
    let daemon = environment.start().await;
    let after = instance_of(daemon.channel().await).await;
    assert_eq!(after.instance_id, before.instance_id);
    assert_eq!(after.public_key, before.public_key);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_master_key_refuses_to_start_and_changes_nothing_on_sqlite() {
    wrong_master_key_refuses_to_start_and_changes_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_master_key_refuses_to_start_and_changes_nothing_on_postgres() {
    wrong_master_key_refuses_to_start_and_changes_nothing(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_master_key_is_a_clear_error() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let config = with_master_key(environment.config(), "not base64 at all!");
    let error = match environment.start_with(config).await {
        Ok(_) => panic!("must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("MOSAIC_MASTER_KEY"), "{error}");
    let store = environment.store().await;
    assert!(
        store.load_instance().await.expect("load").is_none(),
        "no identity half-made"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_private_key_is_sealed_under_the_master_key() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let master_key = MasterKey::generate().expect("key");
    let config = with_master_key(environment.config(), &master_key.to_base64());
    let daemon = environment.start_with(config).await.expect("start");
    let instance = instance_of(daemon.channel().await).await;
    daemon.stop().await;

    let store = environment.store().await;
    let (_, keys) = store
        .load_instance()
        .await
        .expect("load")
        .expect("identity");
    let current = keys.iter().find(|key| key.is_current).expect("current key");
    assert_eq!(current.public_key, instance.public_key);
    // The sealed blob is not a PKCS#8 document and does not contain the public
    // point that a plaintext PKCS#8 would embed.
    let point = &instance.public_key[26..];
    assert!(
        !current
            .sealed_private_key
            .windows(point.len())
            .any(|window| window == point)
    );
    assert!(!current.sealed_private_key.starts_with(&[0x30]));
    // With the master key given in the environment, no key file was written.
    assert!(!environment.data_dir.path().join("master.key").exists());
    // Debug output of the stored row never shows the sealed bytes either.
    assert!(!format!("{current:?}").contains(&format!("{:?}", &current.sealed_private_key[..8])));
}

#[tokio::test(flavor = "multi_thread")]
async fn default_master_key_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    daemon.stop().await;
    let path = environment.data_dir.path().join("master.key");
    let mode = std::fs::metadata(&path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_key_file_is_a_clear_error_and_changes_nothing() {
    let environment = TestEnvironment::new(Backend::Sqlite).await;
    let daemon = environment.start().await;
    let before = instance_of(daemon.channel().await).await;
    daemon.stop().await;
    let path = environment.data_dir.path().join("master.key");
    std::fs::write(&path, "garbage\n").expect("corrupt the key file");
    let error = match environment.start_with(environment.config()).await {
        Ok(_) => panic!("must not start"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("master.key"), "{error}");
    let store = environment.store().await;
    let (instance, _) = store
        .load_instance()
        .await
        .expect("load")
        .expect("identity");
    assert_eq!(instance.instance_id, before.instance_id);
}

async fn rotation_makes_a_new_key_current_and_keeps_the_old_in_grace(backend: Backend) {
    let environment = TestEnvironment::new(backend).await;
    let daemon = environment.start().await;
    let admin = daemon.api_key(&[Scope::Admin]).await;
    let before = instance_of(daemon.channel().await).await;

    let rotated = pb::federation_client::FederationClient::new(daemon.channel().await)
        .rotate_keys(with_key(
            pb::RotateKeysRequest {
                grace_period_seconds: Some(3600),
            },
            &admin,
        ))
        .await
        .expect("RotateKeys")
        .into_inner();
    let current = rotated.current_key.expect("current");
    let previous = rotated.previous_key.expect("previous");
    assert_ne!(current.public_key, before.public_key);
    assert_eq!(previous.public_key, before.public_key);
    let valid_until = previous.valid_until.expect("valid_until").seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now + 3590..=now + 3610).contains(&valid_until),
        "{valid_until} vs {now}"
    );

    // GetInstance shows the new key and lists the old one; the certificate follows.
    let after = instance_of(daemon.channel().await).await;
    assert_eq!(after.public_key, current.public_key);
    assert_eq!(after.instance_id, before.instance_id);
    assert_eq!(after.previous_keys.len(), 1);
    assert_eq!(after.previous_keys[0].public_key, before.public_key);
    let new_key = PublicKey::from_spki_der(&current.public_key).expect("spki");
    let pinned_new = daemon
        .channel_pinned(ServerPin::PublicKey(new_key))
        .await
        .expect("TLS now presents the new key");
    instance_of(pinned_new).await;
    daemon.stop().await;

    // A restart keeps both.
    let daemon = environment.start().await;
    let restarted = instance_of(daemon.channel().await).await;
    assert_eq!(restarted.public_key, current.public_key);
    assert_eq!(restarted.previous_keys.len(), 1);
    daemon.stop().await;
    environment.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_makes_a_new_key_current_and_keeps_the_old_in_grace_on_sqlite() {
    rotation_makes_a_new_key_current_and_keeps_the_old_in_grace(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_makes_a_new_key_current_and_keeps_the_old_in_grace_on_postgres() {
    rotation_makes_a_new_key_current_and_keeps_the_old_in_grace(Backend::Postgres).await;
}
