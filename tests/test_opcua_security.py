"""The OPC UA bridge's server with security on, in this process: a signed and encrypted session with the
configured user and certificates is served, a session without security or without the user is refused,
and a certificate that cannot be read is a configuration error that names the key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("asyncua")

from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from inspector.config import OpcuaSettings
from inspector.errors import ConfigError
from inspector.tools.opcua.bridge import make_server
from tests.portkit import free_port


async def _pair(folder: Path, name: str, use: ExtendedKeyUsageOID, uri: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.der"
    await setup_self_signed_certificate(key, cert, uri, "localhost", [use], {"commonName": name})
    return cert, key


async def _session(endpoint: str, client_pair: tuple[Path, Path] | None, user: str | None, password: str | None):
    """The NamespaceArray a session reads, or the exception that refused it."""
    client = Client(endpoint, timeout=10)
    client.application_uri = "urn:inspector:test:client"
    if client_pair:
        await client.set_security(security_policies.SecurityPolicyBasic256Sha256, str(client_pair[0]),
                                  str(client_pair[1]), mode=ua.MessageSecurityMode.SignAndEncrypt)
    if user:
        client.set_user(user)
        client.set_password(password)
    try:
        await client.connect()
    except Exception as exc:
        return exc
    try:
        return await client.get_node(ua.ObjectIds.Server_NamespaceArray).read_value()
    finally:
        await client.disconnect()


def test_a_signed_and_encrypted_session_for_the_configured_user_only(tmp_path):
    async def scenario() -> dict:
        server_cert, server_key = await _pair(tmp_path, "server", ExtendedKeyUsageOID.SERVER_AUTH,
                                              "urn:freeopcua:python:server")
        client_pair = await _pair(tmp_path, "client", ExtendedKeyUsageOID.CLIENT_AUTH, "urn:inspector:test:client")
        endpoint = f"opc.tcp://127.0.0.1:{free_port()}/inspector"
        settings = OpcuaSettings(endpoint=endpoint, security=["sign_and_encrypt"], certificate=str(server_cert),
                                 private_key=str(server_key), username="plc", password="pw")
        server = await make_server(settings)
        await server.register_namespace(settings.namespace)
        await server.start()
        try:
            return {"secured": await _session(endpoint, client_pair, "plc", "pw"),
                    "wrong password": await _session(endpoint, client_pair, "plc", "nope"),
                    "anonymous": await _session(endpoint, client_pair, None, None),
                    "no security": await _session(endpoint, None, "plc", "pw")}
        finally:
            await server.stop()

    outcome = asyncio.run(scenario())
    assert isinstance(outcome["secured"], list) and "urn:inspector:results" in outcome["secured"], outcome
    for refused in ("wrong password", "anonymous", "no security"):
        assert isinstance(outcome[refused], BaseException), refused


def test_a_certificate_that_cannot_be_read_names_the_key(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    for certificate, why in ((tmp_path / "missing.der", "opcua.certificate"), (key, "opcua.certificate")):
        settings = OpcuaSettings(security=["sign"], certificate=str(certificate), private_key=str(key))
        with pytest.raises(ConfigError, match=why):
            asyncio.run(make_server(settings))
