use containerd_shim::bootstrap::LogLevel;
use containerd_shim::protos::protobuf::EnumOrUnknown;

use super::*;

const ID: &str = "pod-1";
const NAMESPACE: &str = "k8s.io";
const TTRPC: &str = "/run/containerd/containerd.sock.ttrpc";

fn flags() -> Flags {
    Flags {
        id: ID.into(),
        namespace: NAMESPACE.into(),
        address: "/run/containerd/containerd.sock".into(),
        publish_binary: "/usr/bin/containerd".into(),
        action: "start".into(),
        ..Default::default()
    }
}

fn legacy_env() -> LegacyEnv {
    LegacyEnv {
        ttrpc_address: Some(TTRPC.into()),
        grpc_address: None,
    }
}

/// Our runtime options (runtimeoptions.v1.Options) with an inline config, as containerd's `typeurl`
/// names them (a bare type name).
fn runtime_options(body: &str) -> Any {
    // Field 3 (config_body), length-delimited: the message is declared in options.rs.
    let mut value = vec![0x1a];
    value.push(u8::try_from(body.len()).unwrap());
    value.extend_from_slice(body.as_bytes());
    Any {
        type_url: options::RUNTIME_OPTIONS_TYPE.into(),
        value,
        ..Default::default()
    }
}

/// What containerd 2.3 writes: BootstrapParams with the runtime options as an extension.
fn bootstrap_params(options: Option<Any>) -> BootstrapParams {
    let mut params = BootstrapParams {
        instance_id: ID.into(),
        namespace: NAMESPACE.into(),
        log_level: EnumOrUnknown::new(LogLevel::LOG_LEVEL_INFO),
        containerd_version: "v2.3.2".into(),
        containerd_ttrpc_address: TTRPC.into(),
        containerd_grpc_address: "/run/containerd/containerd.sock".into(),
        containerd_binary: "/usr/bin/containerd".into(),
        socket_dir: Some("/run/containerd/s2".into()),
        ..Default::default()
    };
    if let Some(any) = options {
        params.extensions.push(Extension {
            value: Some(any).into(),
            ..Default::default()
        });
    }
    params
}

#[test]
fn test_containerd_2_3_params_are_read_and_answered_with_a_bootstrap_result() {
    let input = bootstrap_params(Some(runtime_options("log_level = \"debug\"\n")))
        .write_to_bytes()
        .unwrap();
    // No environment: 2.3 passes everything in the message.
    let (opts, protocol) = parse_start(&input, &flags(), &LegacyEnv::default()).unwrap();
    assert_eq!(protocol, Protocol::Bootstrap);
    assert_eq!(opts.ttrpc_address, TTRPC);
    assert_eq!(opts.containerd_version, "v2.3.2");
    assert_eq!(opts.socket_dir.as_deref(), Some("/run/containerd/s2"));
    assert!(!opts.debug);
    assert!(opts
        .socket_address("pod-1")
        .starts_with("unix:///run/containerd/s2/"));
    assert_eq!(opts.extensions.len(), 1);

    let reply = reply("unix:///run/containerd/s2/abc", protocol).unwrap();
    let result = BootstrapResult::parse_from_bytes(&reply).unwrap();
    assert_eq!(result.version, BOOTSTRAP_TASK_API);
    assert_eq!(result.address, "unix:///run/containerd/s2/abc");
    assert_eq!(result.protocol, "ttrpc");
}

#[test]
fn test_a_debug_log_level_or_flag_makes_a_debug_daemon() {
    let mut params = bootstrap_params(None);
    params.log_level = EnumOrUnknown::new(LogLevel::LOG_LEVEL_DEBUG);
    let input = params.write_to_bytes().unwrap();
    assert!(
        parse_start(&input, &flags(), &LegacyEnv::default())
            .unwrap()
            .0
            .debug
    );

    let input = bootstrap_params(None).write_to_bytes().unwrap();
    let debug = Flags {
        debug: true,
        ..flags()
    };
    assert!(
        parse_start(&input, &debug, &LegacyEnv::default())
            .unwrap()
            .0
            .debug
    );
}

#[test]
fn test_containerd_1_7_and_2_1_get_a_bare_address_whatever_their_stdin() {
    let options = runtime_options("log_level = \"debug\"\n")
        .write_to_bytes()
        .unwrap();
    for input in [Vec::new(), options] {
        let (opts, protocol) = parse_start(&input, &flags(), &legacy_env()).unwrap();
        assert_eq!(protocol, Protocol::Legacy);
        assert_eq!(opts.ttrpc_address, TTRPC);
        assert_eq!(opts.address, "/run/containerd/containerd.sock");
        assert_eq!(opts.socket_dir, None);
        // containerd 1.7 takes a bare address as task API 2 and refuses JSON above version 2.
        let reply = reply("unix:///run/containerd/s/abc", protocol).unwrap();
        assert_eq!(reply, b"unix:///run/containerd/s/abc");
    }
}

#[test]
fn test_legacy_runtime_options_become_the_extension_the_daemon_checks() {
    let input = runtime_options("log_level = \"debug\"\n")
        .write_to_bytes()
        .unwrap();
    let (opts, _) = parse_start(&input, &flags(), &legacy_env()).unwrap();
    assert_eq!(opts.extensions.len(), 1);
    assert_eq!(opts.extensions[0].type_url, options::RUNTIME_OPTIONS_TYPE);
}

#[test]
fn test_a_bad_inline_config_fails_start_in_both_protocols() {
    let bad = runtime_options("log_level = \"loud\"\n");
    let legacy = bad.write_to_bytes().unwrap();
    let err = parse_start(&legacy, &flags(), &legacy_env()).unwrap_err();
    assert!(matches!(err, BootstrapError::Options(_)), "{err:?}");

    let modern = bootstrap_params(Some(bad)).write_to_bytes().unwrap();
    let err = parse_start(&modern, &flags(), &LegacyEnv::default()).unwrap_err();
    assert!(matches!(err, BootstrapError::Options(_)), "{err:?}");
    assert!(
        crate::error_chain(&err).contains("runtime options"),
        "{err}"
    );
}

#[test]
fn test_params_for_another_instance_are_refused_with_both_names() {
    let mut params = bootstrap_params(None);
    params.instance_id = "other".into();
    let err = parse_start(&params.write_to_bytes().unwrap(), &flags(), &legacy_env()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("k8s.io/other") && text.contains("k8s.io/pod-1"),
        "{text}"
    );
}

#[test]
fn test_missing_ttrpc_address_is_an_error_in_both_protocols() {
    let mut params = bootstrap_params(None);
    params.containerd_ttrpc_address.clear();
    let err = parse_start(
        &params.write_to_bytes().unwrap(),
        &flags(),
        &LegacyEnv::default(),
    );
    assert!(
        matches!(err, Err(BootstrapError::NoTtrpcAddress)),
        "{err:?}"
    );
    let err = parse_start(&[], &flags(), &LegacyEnv::default());
    assert!(matches!(err, Err(BootstrapError::NoTtrpcEnv)), "{err:?}");
}

#[test]
fn test_garbage_on_stdin_is_not_taken_for_bootstrap_params() {
    // Not a protobuf message at all: the legacy protocol, options ignored like containerd does.
    let (_, protocol) = parse_start(b"\xff\xff\xff\xff", &flags(), &legacy_env()).unwrap();
    assert_eq!(protocol, Protocol::Legacy);
}
