//! Tests of the configuration: sources, defaults, and bad keys named.

use super::*;

fn args_with_dir() -> ConfigArgs {
    ConfigArgs {
        data_dir: Some(PathBuf::from("/tmp/mosaic-test")),
        ..ConfigArgs::default()
    }
}

#[test]
fn defaults_are_sqlite_in_the_data_dir_and_loopback_tls() {
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert_eq!(config.database_url, "sqlite:///tmp/mosaic-test/mosaic.db");
    assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.instance.public_url, "https://127.0.0.1:7443");
    assert!(!config.plaintext);
    assert_eq!(config.rotation_grace, Duration::from_secs(86_400));
}

#[test]
fn flags_win_over_the_file() {
    let file = parse_file("listen = \"127.0.0.1:9000\"\n[instance]\nname = \"from-file\"\n")
        .expect("parse");
    let mut args = args_with_dir();
    args.name = Some("from-flag".into());
    let config = Config::resolve(file, &args).expect("config");
    assert_eq!(config.instance.name, "from-flag");
    assert_eq!(config.listen.port(), 9000);
}

#[test]
fn plaintext_is_refused_off_loopback() {
    let mut args = args_with_dir();
    args.plaintext = true;
    args.listen = Some("0.0.0.0:7443".parse().expect("addr"));
    let error = Config::resolve(FileConfig::default(), &args).expect_err("refused");
    assert!(error.to_string().contains("plaintext"), "{error}");
    args.listen = Some("127.0.0.1:7443".parse().expect("addr"));
    assert!(Config::resolve(FileConfig::default(), &args).is_ok());
}

#[test]
fn federation_settings_parse_and_name_their_keys() {
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert_eq!(config.federation.clock_window, Duration::from_secs(300));
    assert!(
        !config
            .federation
            .dial_policy
            .permits("169.254.169.254".parse().expect("ip"))
    );
    let file = parse_file("[federation]\ndial_allow = [\"10.0.0.0/8\"]\nping_interval_ms = 250\n")
        .expect("parse");
    let config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(config.federation.ping_interval, Duration::from_millis(250));
    assert!(
        !config
            .federation
            .dial_policy
            .permits("192.168.1.1".parse().expect("ip"))
    );
    for (text, key) in [
        (
            "[federation]\ndial_deny = [\"10.0.0.0/40\"]\n",
            "federation.dial_deny",
        ),
        (
            "[federation]\nauto_accept_grants = [\"root\"]\n",
            "federation.auto_accept_grants",
        ),
        (
            "[federation]\nauto_accept_fingerprints = [\"x\"]\n",
            "federation.auto_accept_fingerprints",
        ),
        (
            "[federation]\nping_interval_ms = 0\n",
            "federation.ping_interval_ms",
        ),
        (
            "[federation]\npending_request_ttl_secs = 0\n",
            "federation.pending_request_ttl_secs",
        ),
    ] {
        let file = parse_file(text).expect("parse");
        let error = Config::resolve(file, &args_with_dir()).expect_err("refused");
        assert!(error.to_string().contains(key), "{error}");
    }
}

#[test]
fn webhook_sources_resolve_and_secrets_are_overridden_and_never_printed() {
    let file = parse_file(
        "[coordinator.webhooks.github]\nsecret = \"from-file-secret\"\nevents = { push = \"build\" }\n[coordinator.webhooks.my-bot]\n",
    )
    .expect("parse");
    assert!(!format!("{file:?}").contains("from-file-secret"));
    let mut config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(
        config.coordinator.max_payload_bytes,
        DEFAULT_MAX_PAYLOAD_BYTES
    );
    assert_eq!(
        config.coordinator.remote_agent_poll,
        Duration::from_millis(DEFAULT_REMOTE_AGENT_POLL_MS)
    );
    let github = &config.coordinator.webhooks["github"];
    assert_eq!(
        github.secret.as_ref().map(|secret| secret.0.as_str()),
        Some("from-file-secret")
    );
    assert_eq!(github.events["push"], "build");
    assert!(config.coordinator.webhooks["my-bot"].secret.is_none());

    config.coordinator.apply_secret_overrides(|name| {
        (name == "MOSAIC_WEBHOOK_SECRET_MY_BOT").then(|| "from-env-secret".to_owned())
    });
    let bot = &config.coordinator.webhooks["my-bot"];
    assert_eq!(
        bot.secret.as_ref().map(|secret| secret.0.as_str()),
        Some("from-env-secret")
    );
    let printed = format!("{config:?}");
    assert!(!printed.contains("from-env-secret"), "{printed}");
    assert!(!printed.contains("from-file-secret"), "{printed}");
}

#[test]
fn bad_coordinator_settings_name_their_key() {
    for (text, key) in [
        (
            "[coordinator]\nmax_payload_bytes = 10\n",
            "coordinator.max_payload_bytes",
        ),
        (
            "[coordinator]\nremote_agent_poll_ms = 0\n",
            "coordinator.remote_agent_poll_ms",
        ),
        ("[coordinator.webhooks.GitHub]\n", "coordinator.webhooks"),
        (
            "[coordinator.webhooks.github]\nsecret = \"\"\n",
            "coordinator.webhooks.SOURCE.secret",
        ),
    ] {
        let file = parse_file(text).expect("parse");
        let error = Config::resolve(file, &args_with_dir()).expect_err(text);
        assert!(error.to_string().contains(key), "{error}");
    }
    let error = parse_file("[coordinator.webhooks.github]\nsecrt = \"x\"\n").expect_err("typo");
    assert!(error.contains("secrt"), "{error}");
}

#[test]
fn replica_settings_resolve_and_bad_ones_name_their_key() {
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert_eq!(config.replicas.lease, Duration::from_secs(30));
    assert_eq!(config.replicas.advertise_url, None);
    let file =
        parse_file("[replicas]\nlease_secs = 9\nadvertise_url = \"https://10.0.0.5:7443\"\n")
            .expect("parse");
    let config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(config.replicas.lease, Duration::from_secs(9));
    assert_eq!(
        config.replicas.advertise_url.as_deref(),
        Some("https://10.0.0.5:7443")
    );
    for (text, key) in [
        ("[replicas]\nlease_secs = 2\n", "replicas.lease_secs"),
        ("[replicas]\nlease_secs = 3601\n", "replicas.lease_secs"),
        (
            "[replicas]\nadvertise_url = \"10.0.0.5\"\n",
            "replicas.advertise_url",
        ),
        (
            "[replicas]\nadvertise_url = \"ftp://h:1\"\n",
            "replicas.advertise_url",
        ),
    ] {
        let file = parse_file(text).expect("parse");
        let error = Config::resolve(file, &args_with_dir()).expect_err(text);
        assert!(error.to_string().contains(key), "{error}");
    }
}

#[test]
fn the_call_log_level_is_read_and_a_bad_one_names_its_key() {
    use crate::metrics::settings::AccessLog;
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert_eq!(config.access_log, AccessLog::Info);
    for (level, expected) in [
        ("info", AccessLog::Info),
        ("debug", AccessLog::Debug),
        ("off", AccessLog::Off),
    ] {
        let file = parse_file(&format!("[server]\naccess_log = \"{level}\"\n")).expect("parse");
        let config = Config::resolve(file, &args_with_dir()).expect("config");
        assert_eq!(config.access_log, expected);
    }
    let file = parse_file("[server]\naccess_log = \"loud\"\n").expect("parse");
    let error = Config::resolve(file, &args_with_dir()).expect_err("a bad level");
    assert!(error.to_string().contains("server.access_log"), "{error}");
}

#[test]
fn tls_mode_and_its_files_must_agree() {
    use crate::tls::ca::{TlsMode, TlsSettings};
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert_eq!(config.tls, TlsSettings::Pinned);
    let file = parse_file(
        "[tls]\nmode = \"ca\"\ncert_chain = \"/etc/m/chain.pem\"\nca_bundle = \"/etc/m/ca.pem\"\n",
    )
    .expect("parse");
    let config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(
        config.tls,
        TlsSettings::Ca {
            cert_chain: "/etc/m/chain.pem".into(),
            ca_bundle: "/etc/m/ca.pem".into(),
        }
    );
    // Flags win over the file.
    let file = parse_file("[tls]\nmode = \"ca\"\n").expect("parse");
    let mut args = args_with_dir();
    args.tls.mode = Some(TlsMode::Pinned);
    assert_eq!(
        Config::resolve(file, &args).expect("config").tls,
        TlsSettings::Pinned
    );
    for (text, plaintext, key) in [
        (
            "[tls]\nmode = \"ca\"\nca_bundle = \"/ca.pem\"\n",
            false,
            "tls.cert_chain",
        ),
        (
            "[tls]\nmode = \"ca\"\ncert_chain = \"/c.pem\"\n",
            false,
            "tls.ca_bundle",
        ),
        ("[tls]\ncert_chain = \"/c.pem\"\n", false, "tls.mode"),
        (
            "[tls]\nmode = \"ca\"\ncert_chain = \"/c.pem\"\nca_bundle = \"/ca.pem\"\n",
            true,
            "tls.mode",
        ),
    ] {
        let file = parse_file(text).expect("parse");
        let mut args = args_with_dir();
        args.plaintext = plaintext;
        let error = Config::resolve(file, &args).expect_err(text);
        assert!(error.to_string().contains(key), "{text}: {error}");
    }
    let error = parse_file("[tls]\nmode = \"webpki\"\n").expect_err("unknown mode");
    assert!(error.contains("mode"), "{error}");
    let error = parse_file("[tls]\nkey = \"/k.pem\"\n").expect_err("no key file");
    assert!(error.contains("key"), "{error}");
}

#[test]
fn unknown_and_malformed_keys_name_themselves() {
    let error = parse_file("lisen = \"x\"").expect_err("unknown key");
    assert!(error.contains("lisen"), "{error}");
    let error = parse_file("listen = \"not an address\"").expect_err("bad value");
    assert!(error.contains("listen"), "{error}");
    let file = parse_file("[server]\nmax_message_bytes = 1\n").expect("parse");
    let error = Config::resolve(file, &args_with_dir()).expect_err("too small");
    assert!(
        error.to_string().contains("server.max_message_bytes"),
        "{error}"
    );
}

#[test]
fn agent_types_are_read_and_checked() {
    let file = parse_file(
        "[agents]\nmax_concurrent = 3\nkill_grace_secs = 2\n[agents.types.sh]\ncommand = [\"/bin/sh\", \"-c\", \"{prompt}\"]\ntimeout_secs = 60\nenv = { TOKEN = \"s3cret-token\" }\n",
    )
    .expect("parse");
    let config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(config.agents.max_concurrent, 3);
    assert_eq!(config.agents.kill_grace, Duration::from_secs(2));
    let sh = &config.agents.types["sh"];
    assert_eq!(sh.command, ["/bin/sh", "-c", "{prompt}"]);
    assert_eq!(sh.timeout, Duration::from_secs(60));
    let printed = format!("{config:?}");
    assert!(printed.contains("TOKEN"), "{printed}");
    assert!(!printed.contains("s3cret-token"), "{printed}");

    let defaults = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    assert!(defaults.agents.types.is_empty(), "no implicit agent types");

    for (text, key) in [
        ("[agents.types.x]\ncommand = []\n", "command"),
        (
            "[agents.types.x]\ncommand = [\"sh\", \"-c\", \"echo {prompt}\"]\n",
            "command",
        ),
        (
            "[agents.types.x]\ncommand = [\"true\"]\ntimeout_secs = 0\n",
            "timeout_secs",
        ),
        (
            "[agents.types.\"a b\"]\ncommand = [\"true\"]\n",
            "agents.types",
        ),
        ("[agents]\nmax_concurrent = 0\n", "agents.max_concurrent"),
    ] {
        let file = parse_file(text).expect("parse");
        let error = Config::resolve(file, &args_with_dir()).expect_err(text);
        assert!(error.to_string().contains(key), "{text}: {error}");
    }
    let error = parse_file("[agents.types.x]\ncommand = [\"true\"]\ntimeout = 5\n")
        .expect_err("unknown key");
    assert!(error.contains("timeout"), "{error}");
}

#[test]
fn serving_threads_default_to_half_the_cpus_and_a_bad_count_names_its_key() {
    let config = Config::resolve(FileConfig::default(), &args_with_dir()).expect("config");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    assert_eq!(config.serving_threads, (cpus / 2).max(1));
    let file = parse_file("[server]\nserving_threads = 3\n").expect("parse");
    let config = Config::resolve(file, &args_with_dir()).expect("config");
    assert_eq!(config.serving_threads, 3);
    for count in [0, 257] {
        let file = parse_file(&format!("[server]\nserving_threads = {count}\n")).expect("parse");
        let error = Config::resolve(file, &args_with_dir()).expect_err("a bad count");
        assert!(
            error.to_string().contains("server.serving_threads"),
            "{error}"
        );
        assert!(error.to_string().contains("between 1 and 256"), "{error}");
    }
}
