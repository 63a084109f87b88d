"""The ConfigMap reporter against a local HTTP(S) server that checks the bearer token and records patches."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess

import pytest
from payload_testkit import TOKEN, FakeConfigMapAPI

from payloads import report as r


def reporter(api: FakeConfigMapAPI, token_file, **kwargs) -> r.ResultReporter:
    sleeps = []
    rep = r.ResultReporter(configmap="viggo-eval-result", namespace="ml", api_url=api.url,
                           token_path=str(token_file), sleep=sleeps.append, **kwargs)
    rep.sleeps = sleeps
    return rep


def test_patch_values_are_strings_and_none_deletes():
    body = r.build_patch(
        {"state": "Succeeded", "message": "done", "metrics": {"rows": 1080, "exactMatch": 0.688},
         "progress": {"rowsTotal": 1080, "rowsDone": 1080}, "outputURI": "s3://b/out", "adapter": None},
        reported_at="2026-11-25T10:00:00Z", env={},
    )
    assert body == {"data": {
        "state": "Succeeded",
        "message": "done",
        "metrics": '{"exactMatch":0.688,"rows":1080}',
        "progress": '{"rowsDone":1080,"rowsTotal":1080}',
        "outputURI": "s3://b/out",
        "adapter": None,
        "reportedAt": "2026-11-25T10:00:00Z",
    }}


@pytest.mark.parametrize("fields, message", [({"status": "x"}, "unknown result keys"), ({"state": "Done"}, "state")])
def test_patch_rejects_keys_and_states_outside_the_contract(fields, message):
    with pytest.raises(ValueError, match=message):
        r.build_patch(fields, "2026-11-25T10:00:00Z")


def test_secrets_never_leave_the_pod():
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "HF_TOKEN": "hf_abcdefghijklmnop", "HOME": "/root"}
    text = ("open s3://bucket/x failed with key wJalrXUtnFEMI/K7MDENG and hf_abcdefghijklmnop; "
            "see https://user:hunter22@example.invalid/a?X-Amz-Signature=deadbeef&part=1 "
            "Authorization: Bearer eyJhbGciOi.sig and sa-token-1234567 in /root")
    out = r.redact(text, secrets=["sa-token-1234567"], env=env)
    for secret in ("wJalrXUtnFEMI/K7MDENG", "hf_abcdefghijklmnop", "hunter22", "deadbeef", "eyJhbGciOi",
                   "sa-token-1234567"):
        assert secret not in out
    assert "s3://bucket/x" in out and "part=1" in out and "/root" in out


def test_report_patches_the_configmap_with_the_bearer_token(configmap_api, token_file):
    sent = reporter(configmap_api, token_file).running("Generating for 20 rows.", {"rowsDone": 0, "rowsTotal": 20},
                                                       metrics=None)
    (request,) = configmap_api.requests
    assert request["method"] == "PATCH"
    assert request["path"] == "/api/v1/namespaces/ml/configmaps/viggo-eval-result"
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["content_type"] == "application/merge-patch+json"
    assert request["status"] == 200
    assert json.loads(request["raw"]) == sent
    assert sent["data"]["state"] == "Running" and sent["data"]["metrics"] is None
    assert sent["data"]["reportedAt"].endswith("Z")


def test_the_token_is_redacted_from_what_is_sent(configmap_api, token_file):
    reporter(configmap_api, token_file).failed(f"oops, the token was {TOKEN}")
    assert TOKEN not in configmap_api.requests[0]["raw"]
    assert configmap_api.data["message"] == f"oops, the token was {r.REDACTED}"


def test_transient_errors_are_retried_with_backoff(configmap_api, token_file):
    configmap_api.fail_with = [503, 429, 500]
    rep = reporter(configmap_api, token_file, attempts=4, backoff_s=0.25)
    rep.succeeded("ok", metrics={"rows": 1})
    assert [q["status"] for q in configmap_api.requests] == [503, 429, 500, 200]
    assert rep.sleeps == [0.25, 0.5, 1.0]
    assert configmap_api.data["state"] == "Succeeded"


def test_transient_errors_give_up_after_the_last_attempt(configmap_api, token_file):
    configmap_api.fail_with = [503] * 5
    rep = reporter(configmap_api, token_file, attempts=3)
    with pytest.raises(r.ReportError, match="after 3 attempt.*HTTP 503"):
        rep.failed("x")
    assert len(configmap_api.requests) == 3


@pytest.mark.parametrize("status", [401, 403, 404, 422])
def test_permanent_errors_are_not_retried(configmap_api, token_file, status):
    configmap_api.fail_with = [status]
    rep = reporter(configmap_api, token_file)
    with pytest.raises(r.ReportError, match=f"HTTP {status}"):
        rep.failed("x")
    assert len(configmap_api.requests) == 1 and rep.sleeps == []


def test_unreachable_server_is_retried_then_reported(token_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    sleeps = []
    rep = r.ResultReporter(configmap="cm", namespace="ml", api_url=f"http://127.0.0.1:{port}",
                           token_path=str(token_file), attempts=3, backoff_s=0.1, timeout_s=2, sleep=sleeps.append)
    with pytest.raises(r.ReportError, match="after 3 attempt"):
        rep.running("x")
    assert sleeps == [0.1, 0.2]


def test_without_a_configmap_the_reporter_only_logs(tmp_path):
    rep = r.ResultReporter.from_env(env={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "LLMOPS_NAMESPACE": "ml"})
    assert rep.configmap is None
    assert rep.failed("nothing to send")["data"]["state"] == "Failed"  # no server, no error


def test_without_an_api_server_a_result_file_ends_as_the_configmap_would(tmp_path, configmap_api, token_file):
    def play(rep):
        rep.running("starting", {"rowsDone": 0, "rowsTotal": 4}, metrics={"exactMatch": 0.1})
        rep.succeeded("done", metrics=None, outputURI="s3://b/out")

    path = tmp_path / "result.json"
    play(r.ResultReporter.from_env(env={"LLMOPS_RESULT_FILE": str(path)}))
    play(reporter(configmap_api, token_file, result_file=str(tmp_path / "unused.json")))
    written = json.loads(path.read_text())
    assert written["state"] == "Succeeded" and "metrics" not in written  # None deletes, as in the ConfigMap
    assert {k: v for k, v in written.items() if k != "reportedAt"} == \
        {k: v for k, v in configmap_api.data.items() if k != "reportedAt"}
    assert not list(tmp_path.glob("result.json.tmp-*"))
    assert not (tmp_path / "unused.json").exists()  # with a ConfigMap, the API server stays the one channel


def test_from_env_uses_the_in_cluster_settings_and_the_test_overrides(tmp_path):
    rep = r.ResultReporter.from_env(env={"LLMOPS_RESULT_CONFIGMAP": "cm", "LLMOPS_NAMESPACE": "ml",
                                         "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert (rep.configmap, rep.namespace, rep.api_url) == ("cm", "ml", "https://[fd00::1]:6443")
    assert rep.token_path == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert rep.ca_path == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    rep = r.ResultReporter.from_env(env={"LLMOPS_RESULT_CONFIGMAP": "cm", "LLMOPS_NAMESPACE": "ml",
                                         "KUBERNETES_SERVICE_HOST": "10.0.0.1",
                                         "LLMOPS_KUBE_API_URL": "http://127.0.0.1:1",
                                         "LLMOPS_SA_TOKEN_PATH": "/tmp/t", "LLMOPS_SA_CA_PATH": "/tmp/ca"})
    assert (rep.api_url, rep.token_path, rep.ca_path) == ("http://127.0.0.1:1", "/tmp/t", "/tmp/ca")


def test_missing_token_is_a_report_error(configmap_api, tmp_path):
    rep = r.ResultReporter(configmap="viggo-eval-result", namespace="ml", api_url=configmap_api.url,
                           token_path=str(tmp_path / "absent"))
    with pytest.raises(r.ReportError, match="service-account token"):
        rep.running("x")
    assert configmap_api.requests == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test CA")
def test_https_is_verified_against_the_service_account_ca(tmp_path, token_file):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    api = FakeConfigMapAPI("ml", "viggo-eval-result", TOKEN).start(ssl_context=context)
    try:
        url = api.url.replace("http://", "https://")
        trusted = r.ResultReporter(configmap="viggo-eval-result", namespace="ml", api_url=url,
                                   token_path=str(token_file), ca_path=str(cert))
        trusted.running("over TLS")
        assert api.data["message"] == "over TLS"
        untrusted = r.ResultReporter(configmap="viggo-eval-result", namespace="ml", api_url=url,
                                     token_path=str(token_file), ca_path=None, attempts=1)
        with pytest.raises(r.ReportError, match="CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError"):
            untrusted.running("must not be sent")
    finally:
        api.stop()
