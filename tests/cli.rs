//! The command line: `validate` accepts every shipped config and refuses bad ones with
//! the documented exit code and an error naming the field and line.

use std::io::Write;
use std::process::Command;

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_esm-gateway"))
        .args(args)
        .output()
        .expect("run esm-gateway")
}

#[test]
fn every_shipped_config_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = gateway(&["validate", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no config files in {dir}");
}

#[test]
fn a_bad_config_exits_78_naming_field_and_line() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "[[mapping]]\nname = \"m\"\nfunction = \"f\"\nsource = {{ type = \"rabbitmq\", url = \"amqp://h\", queue = \"q\" }}\nbatch = {{ size = 10001 }}\n"
    )
    .unwrap();
    for command in ["validate", "run"] {
        let out = gateway(&[command, "--config", f.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("line 5"), "{command}: {stderr}");
        assert!(
            stderr.contains("batch size must be between 1 and 10000, got 10001"),
            "{stderr}"
        );
    }
}

#[test]
fn an_unreadable_api_certificate_exits_78_naming_the_file() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        // No admin listener: `run` must stop at the certificate, before binding anything.
        "[admin]\nenabled = false\n\n[api]\nenabled = true\ncert_file = \"/nonexistent/api.pem\"\nkey_file = \"/nonexistent/api.key\"\n"
    )
    .unwrap();
    for command in ["validate", "run"] {
        let out = gateway(&[command, "--config", f.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{command}");
        let all = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            all.contains("cert_file /nonexistent/api.pem"),
            "{command}: {all}"
        );
    }
}

#[test]
fn a_missing_config_file_exits_78() {
    let out = gateway(&["validate", "--config", "/nonexistent/esm.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/esm.toml")
    );
}

#[test]
fn version_is_printed() {
    let out = gateway(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("esm-gateway {}", env!("CARGO_PKG_VERSION"))
    );
}
