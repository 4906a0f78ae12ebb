"""TLS built in: both clouds serve HTTPS, and the S1-S2 link is mutual TLS.

A CA, server certificates for S1 and S2 (subjectAltName IP 127.0.0.1 and DNS localhost), S1's client
certificate, and a second CA's client certificate (a stranger's) are made here with ``cryptography``.
S2 and S1 run as real processes (``python -m he_cnn serve ... --tls-cert --tls-key``; S2 with
``--tls-client-ca``, S1 with ``--peer-ca --peer-cert --peer-key``), so the whole service speaks only
HTTPS. Checked: the owner uploads and the user queries over HTTPS, exactly (the decrypted vector equals
the plaintext integer reference); S2 refuses a client without a certificate and one whose certificate
another CA signed, before any round; a client that does not trust the CA gets one line, no traceback.
The same query with 2048-bit keys is in the slow tier.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from he_cnn.graph.integer_model import save_integer_model
from he_cnn.graph.reference import classify_reference
from he_cnn.servers.cli import main
from he_cnn.servers.launch import CloudProcess
from he_cnn.user.client import Client
from he_cnn.user.keys import create_user_key

from trust_support import TINY_SIZE, tiny_model


# -- certificates ------------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass(frozen=True)
class Authority:
    """A certificate authority that issues server and client certificates into ``folder``."""

    folder: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> "Authority":
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(folder, key, cert, _write(folder, name, key, cert)[0])

    def issue(self, stem: str, server: bool) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1 / localhost (a server's, or a client's); its (cert, key) files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return _write(self.folder, stem, key, cert)


@dataclass(frozen=True)
class PKI:
    ca: Path  # what clients and S1 trust
    s1_server: tuple[Path, Path]
    s2_server: tuple[Path, Path]
    s1_client: tuple[Path, Path]  # S1's certificate for S2
    stranger_client: tuple[Path, Path]  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority.create(folder, "he-cnn-test-ca"), Authority.create(folder, "stranger-ca")
    return PKI(ca.cert_path, ca.issue("s1-server", True), ca.issue("s2-server", True), ca.issue("s1-client", False),
               other.issue("stranger-client", False))


# -- the clouds over HTTPS + mTLS -----------------------------------------------------------------

class TLSClouds:
    """S2 (HTTPS, client certificates required) and S1 (HTTPS, S1's certificate towards S2) as processes."""

    def __init__(self, root: Path, pki: PKI, key_bits: int):
        self.pki = pki
        self.cloud_token = secrets.token_urlsafe(24)
        self.owner_token = secrets.token_urlsafe(24)
        self.logs: list[str] = []
        env = {"HECNN_RANDOMNESS_POOL": "0"}
        self.s1: CloudProcess | None = None
        self.s2 = CloudProcess("S2", ["--data-dir", str(root / "s2"), "--key-bits", str(key_bits), "--quiet",
                                      "--tls-cert", str(pki.s2_server[0]), "--tls-key", str(pki.s2_server[1]),
                                      "--tls-client-ca", str(pki.ca)],
                               {**env, "HECNN_S2_CLOUD_TOKEN": self.cloud_token}, on_log=self.logs.append,
                               tls_ca=pki.ca, client_cert=pki.s1_client)
        try:
            self.s2_url = self.s2.wait_ready()
            self.s1 = CloudProcess("S1", ["--data-dir", str(root / "s1"), "--peer-url", self.s2_url, "--quiet", "--open",
                                          "--tls-cert", str(pki.s1_server[0]), "--tls-key", str(pki.s1_server[1]),
                                          "--peer-ca", str(pki.ca), "--peer-cert", str(pki.s1_client[0]),
                                          "--peer-key", str(pki.s1_client[1])],
                                   {**env, "HECNN_S1_CLOUD_TOKEN": self.cloud_token,
                                    "HECNN_S1_OWNER_TOKEN": self.owner_token},
                                   on_log=self.logs.append, tls_ca=pki.ca)
            self.s1_url = self.s1.wait_ready()
        except BaseException:
            self.stop(check=False)
            raise

    def stop(self, check: bool = True) -> None:
        codes = [cloud.stop() for cloud in (self.s1, self.s2) if cloud is not None]
        if check:
            assert codes == [0, 0], self.logs[-20:]
            text = "\n".join(self.logs)
            assert "Traceback" not in text, text[-3000:]
            assert self.cloud_token not in text and self.owner_token not in text


def he_cnn(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The ``he-cnn`` command as a process of its own (no HECNN_TLS_CA inherited from the caller)."""
    base = {k: v for k, v in os.environ.items() if k != "HECNN_TLS_CA"}
    return subprocess.run([sys.executable, "-m", "he_cnn", *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, "HECNN_RANDOMNESS_POOL": "0", **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny model's file, a 1024-bit user key, an image for the model."""
    folder = tmp_path_factory.mktemp("user")
    model_path, key, image = folder / "tiny.json", folder / "me.key", folder / "image.npy"
    save_integer_model(tiny_model(), model_path)
    create_user_key(key, 1024)
    np.save(image, (np.arange(TINY_SIZE * TINY_SIZE).reshape(TINY_SIZE, TINY_SIZE) * 7) % 16)
    return model_path, key, image


@pytest.fixture(scope="module")
def clouds(tmp_path_factory, pki):
    pair = TLSClouds(tmp_path_factory.mktemp("clouds"), pki, 1024)
    yield pair
    pair.stop()


def upload_and_query(clouds: TLSClouds, model_path: Path, key: Path, image: Path) -> str:
    """The owner uploads with ``he-cnn owner upload --tls-ca``, the user queries with the Python client
    (its ``tls_ca``) and with ``he-cnn user query --tls-ca``: both exact. The model id."""
    done = he_cnn("owner", "upload", "--model", str(model_path), "--s1", clouds.s1_url, "--tls-ca", str(clouds.pki.ca),
                  "--json", "--quiet", env={"HECNN_OWNER_TOKEN": clouds.owner_token})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    model_id = json.loads(done.stdout)["model_id"]

    result = Client(clouds.s1_url, key, model=model_id, tls_ca=clouds.pki.ca).classify(image)[0]
    assert result.vector == [int(v) for v in classify_reference(tiny_model(), result.pixels)]
    assert result.server["rounds"] > 0

    done = he_cnn("user", "query", "--s1", clouds.s1_url, "--model", model_id, "--key", str(key), "--json",
                  "--no-progress", str(image), env={"HECNN_TLS_CA": str(clouds.pki.ca)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["vector"] == result.vector
    return model_id


def test_exact_query_over_https_and_mutual_tls(clouds, user_files):
    assert clouds.s1_url.startswith("https://") and clouds.s2_url.startswith("https://")
    upload_and_query(clouds, *user_files)


def test_s2_refuses_clients_without_s1s_certificate(clouds):
    """Without a client certificate, or with one another CA signed, S2 ends the connection in the TLS
    handshake: no answer at all, let alone a protocol round. S1's own certificate gets in."""
    ca = str(clouds.pki.ca)
    auth = {"Authorization": f"Bearer {clouds.cloud_token}", "Content-Type": "application/octet-stream"}
    for cert in (None, tuple(map(str, clouds.pki.stranger_client))):
        for method, path in (("GET", "/v1/health"), ("POST", "/v1/rounds/relu")):
            try:
                response = requests.request(method, clouds.s2_url + path, headers=auth, data=b"x" * 64, verify=ca,
                                            cert=cert, timeout=10)
            except requests.exceptions.RequestException:  # refused in the handshake
                continue
            assert 400 <= response.status_code < 500, (cert, path, response.status_code)
    admitted = requests.get(clouds.s2_url + "/v1/health", verify=ca, timeout=10,
                            cert=tuple(map(str, clouds.pki.s1_client)))
    assert admitted.status_code == 200


def test_client_that_does_not_trust_the_ca_gets_one_line(clouds, user_files):
    _, key, image = user_files
    done = he_cnn("user", "query", "--s1", clouds.s1_url, "--model", "0" * 16, "--key", str(key), str(image))
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert f"S1 at {clouds.s1_url}" in lines[0] and "certificate" in lines[0] and "--tls-ca" in lines[0], lines[0]
    admin = he_cnn("admin", "user", "list", "--s1", clouds.s1_url, env={"HECNN_OWNER_TOKEN": clouds.owner_token})
    assert admin.returncode == 1 and "Traceback" not in admin.stderr and "certificate" in admin.stderr, admin.stderr
    trusted = he_cnn("admin", "user", "list", "--s1", clouds.s1_url, "--tls-ca", str(clouds.pki.ca),
                     env={"HECNN_OWNER_TOKEN": clouds.owner_token})
    assert trusted.returncode == 0, trusted.stderr


@pytest.mark.slow
def test_exact_query_over_https_and_mutual_tls_2048_bits(tmp_path, pki):
    """The e2e tier's HTTPS + mTLS run with 2048-bit cloud and user keys."""
    pair = TLSClouds(tmp_path / "clouds", pki, 2048)
    try:
        key = tmp_path / "me.key"
        create_user_key(key, 2048)
        model_path, image = tmp_path / "tiny.json", tmp_path / "image.npy"
        save_integer_model(tiny_model(), model_path)
        np.save(image, (np.arange(TINY_SIZE * TINY_SIZE).reshape(TINY_SIZE, TINY_SIZE) * 5) % 16)
        health = requests.get(pair.s2_url + "/v1/health", verify=str(pki.ca), cert=tuple(map(str, pki.s1_client)),
                              timeout=10).json()
        assert health["key_bits"] == 2048
        upload_and_query(pair, model_path, key, image)
    finally:
        pair.stop()


@pytest.mark.parametrize("flags, said", [
    (["--tls-cert", "{key}", "--tls-key", "{key}"], "not usable"),
    (["--tls-cert", "{cert}"], "needs both a certificate and its key"),
    (["--tls-client-ca", "{ca}"], "a TLS client CA needs TLS itself"),
])
def test_bad_tls_settings_are_one_line_before_the_data_directory(tmp_path, pki, flags, said):
    files = {"cert": str(pki.s2_server[0]), "key": str(pki.s2_server[1]), "ca": str(pki.ca)}
    data_dir = tmp_path / "s2"
    result = CliRunner().invoke(main, ["serve", "s2", "--port", "0", "--data-dir", str(data_dir),
                                       *[f.format(**files) for f in flags]],
                                env={"HECNN_S2_CLOUD_TOKEN": "c" * 24})
    assert result.exit_code == 1 and said in result.output, result.output
    assert not data_dir.exists()
