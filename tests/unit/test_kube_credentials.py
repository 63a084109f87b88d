"""The operator's own API client trusts the cluster's CA however kopf found it: a kubeconfig's
certificate-authority-data is base64 of the PEM (what GKE's and EKS's kubeconfigs carry), a pod's service account
CA is a PEM file."""

from __future__ import annotations

import base64
import re
import ssl

import certifi
import pytest

from llmops.kube import Credentials, Kube, pem

CA_PEM = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n",
                   open(certifi.where()).read(), re.S).group(0)


@pytest.mark.parametrize("ca_data", [base64.b64encode(CA_PEM.encode()).decode(), CA_PEM, CA_PEM.encode(),
                                     base64.b64encode(CA_PEM.encode())],
                         ids=["kubeconfig-base64", "pem-text", "pem-bytes", "base64-bytes"])
def test_ca_data_in_every_form_kopf_passes(ca_data):
    assert pem(ca_data) == CA_PEM
    context = Kube(Credentials(server="https://127.0.0.1:6443", ca_data=ca_data), "llmops")._ssl()
    assert isinstance(context, ssl.SSLContext) and context.cert_store_stats()["x509_ca"] >= 1
