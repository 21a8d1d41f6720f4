//! The shared flags: stolon's names, `ST*_` environment variables, secrets from files.

use clap::Parser;
use control::cli::{read_secret_file, try_parse_from_with_env, CommonArgs};
use std::time::Duration;

#[derive(Parser, Debug)]
struct Tool {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long, default_value_t = 5432)]
    port: u16,
}

#[derive(Parser, Debug)]
struct Ctl {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    Status {
        #[arg(long, default_value = "text")]
        format: String,
    },
}

#[test]
fn flags_with_stolon_names_and_defaults() {
    let t: Tool =
        try_parse_from_with_env("STT1_", ["tool", "--cluster-name", "c1"]).expect("parse");
    let c = &t.common;
    assert_eq!(c.cluster_name, "c1");
    assert_eq!(c.store_backend, "etcdv3");
    assert_eq!(c.store_endpoints, "http://127.0.0.1:2379");
    assert_eq!(c.store_timeout, Duration::from_secs(5));
    assert_eq!(c.store_prefix, "stolon/cluster");
    assert_eq!(c.log_level, "info");
    let cfg = c.etcd_config().expect("config");
    assert_eq!(cfg.endpoints, vec!["http://127.0.0.1:2379"]);
}

#[test]
fn environment_variables_with_the_component_prefix() {
    // Unique prefix: tests share the process environment.
    std::env::set_var("STT2_CLUSTER_NAME", "from-env");
    std::env::set_var(
        "STT2_STORE_ENDPOINTS",
        "http://127.0.0.1:1,http://127.0.0.1:2",
    );
    std::env::set_var("STT2_STORE_TIMEOUT", "750ms");
    std::env::set_var("STT2_PORT", "6543");
    let t: Tool = try_parse_from_with_env("STT2_", ["tool"]).expect("parse");
    assert_eq!(t.common.cluster_name, "from-env");
    assert_eq!(t.common.store_timeout, Duration::from_millis(750));
    assert_eq!(t.port, 6543, "component flags get the prefix too");
    let cfg = t.common.etcd_config().expect("config");
    assert_eq!(cfg.endpoints.len(), 2);
    // A flag wins over the environment.
    let t: Tool =
        try_parse_from_with_env("STT2_", ["tool", "--cluster-name", "flag"]).expect("parse");
    assert_eq!(t.common.cluster_name, "flag");
}

#[test]
fn subcommands_get_environment_variables() {
    std::env::set_var("STT3_CLUSTER_NAME", "c");
    std::env::set_var("STT3_FORMAT", "json");
    let c: Ctl = try_parse_from_with_env("STT3_", ["ctl", "status"]).expect("parse");
    let Sub::Status { format } = c.cmd;
    assert_eq!(format, "json");
}

#[test]
fn clear_errors_for_bad_flags() {
    // The cluster name is checked after parsing (so `stolonctl version` needs none).
    let t: Tool = try_parse_from_with_env("STT4_", ["tool"]).expect("parse");
    let err = t.common.check().expect_err("missing");
    assert!(err.contains("--cluster-name"), "{err}");
    let err = try_parse_from_with_env::<Tool, _, _>(
        "STT4_",
        [
            "tool",
            "--cluster-name",
            "c",
            "--store-timeout",
            "5 seconds",
        ],
    )
    .expect_err("bad duration");
    assert!(err.to_string().contains("invalid duration"), "{err}");
    // Go stolon's other backends: refused with the supported one and the migration path.
    for backend in ["consul", "etcd", "etcdv2", "kubernetes"] {
        let t: Tool = try_parse_from_with_env(
            "STT4_",
            ["tool", "--cluster-name", "c", "--store-backend", backend],
        )
        .expect("parse");
        let err = t.common.check().expect_err("backend");
        assert!(
            err.contains("etcdv3") && err.contains("clusterdata write"),
            "{err}"
        );
    }
    let t: Tool = try_parse_from_with_env(
        "STT4_",
        ["tool", "--cluster-name", "c", "--store-backend", "nosuch"],
    )
    .expect("parse");
    assert!(t
        .common
        .check()
        .expect_err("unknown")
        .contains("unknown store backend"));
}

#[test]
fn go_stolons_flags_are_accepted() {
    let t: Tool = try_parse_from_with_env(
        "STT7_",
        [
            "tool",
            "--cluster-name",
            "c",
            "--debug",
            "--log-color",
            "--store-key",
            "/k.pem",
            "--store-skip-tls-verify",
        ],
    )
    .expect("parse");
    let c = &t.common;
    assert_eq!(c.effective_log_level(), "debug");
    assert_eq!(c.log_color, Some(true));
    assert_eq!(c.store_key.as_deref(), Some(std::path::Path::new("/k.pem")));
    assert!(c.check().is_ok());
    let t: Tool = try_parse_from_with_env(
        "STT7_",
        [
            "tool",
            "--cluster-name",
            "c",
            "--store-key-file",
            "/k2.pem",
            "--log-color=false",
        ],
    )
    .expect("parse");
    assert_eq!(
        t.common.store_key.as_deref(),
        Some(std::path::Path::new("/k2.pem"))
    );
    assert_eq!(t.common.log_color, Some(false));
    let t: Tool = try_parse_from_with_env(
        "STT7_",
        [
            "tool",
            "--cluster-name",
            "c",
            "--kube-resource-kind",
            "configmap",
        ],
    )
    .expect("parse");
    let err = t.common.check().expect_err("kube flag without kubernetes");
    assert!(
        err.contains("--kube-resource-kind") && err.contains("etcdv3"),
        "{err}"
    );
}

#[test]
fn help_names_the_environment_variable() {
    let err = try_parse_from_with_env::<Tool, _, _>("STT5_", ["tool", "--help"]).expect_err("help");
    let help = err.to_string();
    assert!(help.contains("STT5_STORE_ENDPOINTS"), "{help}");
    assert!(help.contains("--metrics-listen-address"), "{help}");
}

#[test]
fn secret_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("pw");
    std::fs::write(&p, "s3cret\n").expect("write");
    assert_eq!(read_secret_file(&p).expect("read"), "s3cret");
    std::fs::write(&p, "s3cret\r\n").expect("write");
    assert_eq!(read_secret_file(&p).expect("read"), "s3cret");
    std::fs::write(&p, "two\nlines\n").expect("write");
    assert_eq!(read_secret_file(&p).expect("read"), "two\nlines");
    std::fs::write(&p, "\n").expect("write");
    let err = read_secret_file(&p).expect_err("empty");
    assert!(err.contains("is empty") && !err.contains("s3cret"), "{err}");
    let err = read_secret_file(&dir.path().join("missing")).expect_err("missing");
    assert!(err.contains("cannot read password file"), "{err}");
}

#[test]
fn etcd_password_is_redacted_in_debug() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("pw");
    std::fs::write(&p, "hunter2\n").expect("write");
    let t: Tool = try_parse_from_with_env(
        "STT6_",
        [
            "tool".into(),
            "--cluster-name".into(),
            "c".into(),
            "--store-user".into(),
            "root".into(),
            "--store-password-file".into(),
            p.display().to_string(),
        ],
    )
    .expect("parse");
    let cfg = t.common.etcd_config().expect("config");
    assert_eq!(cfg.password.as_deref(), Some("hunter2"));
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("hunter2") && shown.contains("redacted"),
        "{shown}"
    );
}
