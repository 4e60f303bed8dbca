//! TLS end to end: a client reaches the queen over https, the queen reaches the hive over https
//! (trusting the CA in its `tls.ca_file`), the hive beats to the queen over https; each side
//! shows the other a client certificate its `client_ca_file` signed, and a heartbeat or a hive
//! call without one is refused; plain HTTP on the TLS port gets nothing; a renewed certificate
//! is served after SIGHUP without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rbee_test_harness::{Daemon, HiveOptions, QueenOptions, eventually};
use serde_json::{Value, json};

const CLIENT: &str = "client-token-0123456789abcdef";
const JOIN: &str = "join-token-0123456789abcdef";
const HIVE: &str = "hive-token-0123456789abcdef";

/// A CA, and a certificate it signed for 127.0.0.1 and localhost: (ca.pem, cert.pem, key.pem).
fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("rbee test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let ca_file = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let cert_file = dir.join(format!("{name}-cert.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    let key_file =
        rbee_test_harness::write_secret(&dir.join(format!("{name}-key.pem")), &key.serialize_pem());
    (ca_file, cert_file, key_file)
}

/// A client that trusts only the CA in `ca_file`.
fn trusting(ca_file: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_file).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

fn https(daemon: &Daemon) -> String {
    daemon.base_url.replacen("http://", "https://", 1)
}

#[tokio::test]
async fn clients_queen_and_hive_talk_over_tls_and_a_renewed_certificate_is_served() {
    let dir = rbee_test_harness::temp_dir("tls");
    let (ca, cert, key) = issue(&dir, "first");
    let p = |p: &Path| rbee_test_harness::toml_path(p);
    let mut opts = QueenOptions::cluster(("alice", CLIENT), true, JOIN, HIVE);
    // The queen's certificate files are its own copies, renewed in place below.
    let (queen_cert, queen_key) = (dir.join("queen-cert.pem"), dir.join("queen-key.pem"));
    std::fs::copy(&cert, &queen_cert).unwrap();
    rbee_test_harness::write_secret(&queen_key, &std::fs::read_to_string(&key).unwrap());
    opts.config_tail.push_str(&format!(
        "\n[tls]\ncert_file = {}\nkey_file = {}\nca_file = {}\nclient_ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}\n",
        p(&queen_cert),
        p(&queen_key),
        p(&ca),
        p(&ca),
        p(&cert),
        p(&key)
    ));
    let queen = Daemon::queen(opts, "127.0.0.1:0").await.unwrap();
    let queen_url = https(&queen);
    let hive = Daemon::hive(
        HiveOptions::joined(&queen_url, "hive-tls", HIVE, JOIN)
            .env("TLS__CERT_FILE", cert.display())
            .env("TLS__KEY_FILE", key.display())
            .env("TLS__CA_FILE", ca.display())
            .env("TLS__CLIENT_CA_FILE", ca.display())
            .env("TLS__CLIENT_CERT_FILE", cert.display())
            .env("TLS__CLIENT_KEY_FILE", key.display()),
    )
    .await
    .unwrap();
    let c = trusting(&ca);
    eventually(
        Duration::from_secs(30),
        "the hive up over https",
        || async {
            let h: Value = c
                .get(format!("{queen_url}/health"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (h["hives_up"] == 1).then_some(()).ok_or(h)
        },
    )
    .await
    .unwrap();
    let rec: Value = c
        .get(format!("{queen_url}/v1/admin/hives/hive-tls"))
        .bearer_auth(CLIENT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["url"], https(&hive), "{rec}");
    // Client → queen → hive → worker, TLS on both network hops.
    let resp = c
        .post(format!("{queen_url}/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(
            &json!({"model": "smollm2", "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "Say hi."}]}),
        )
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        status,
        200,
        "{body}\n{}\n{}",
        queen.log_excerpt(),
        hive.log_excerpt()
    );
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    // Without a client certificate: a heartbeat is refused (even with the join token), and
    // the hive takes no call at all.
    let fake = c
        .post(format!("{queen_url}/v1/hives/heartbeat"))
        .bearer_auth(JOIN)
        .json(&json!({"hive_id": "fake", "url": "https://127.0.0.1:9", "version": "0.1.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fake.status(), 401);
    let direct = c
        .get(format!("{}/v1/workers", https(&hive)))
        .bearer_auth(HIVE)
        .send()
        .await;
    assert!(direct.is_err(), "{direct:?}");
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(queen.url("/health"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // Renewal: a certificate from another CA replaces the files; SIGHUP serves it.
    let (ca2, cert2, key2) = issue(&dir, "second");
    std::fs::copy(&cert2, &queen_cert).unwrap();
    rbee_test_harness::write_secret(&queen_key, &std::fs::read_to_string(&key2).unwrap());
    queen.signal(libc::SIGHUP);
    let renewed = eventually(
        Duration::from_secs(10),
        "the renewed certificate",
        || async {
            let r = trusting(&ca2)
                .get(format!("{queen_url}/health"))
                .send()
                .await;
            r.ok().filter(|r| r.status() == 200)
        },
    )
    .await;
    assert!(renewed.is_ok(), "{renewed:?}");
    let old = trusting(&ca)
        .get(format!("{queen_url}/health"))
        .send()
        .await;
    assert!(
        old.is_err(),
        "the first CA still verifies the queen: {old:?}"
    );
    drop(hive);
}
