"""The lab's backend server listens as soon as it is built: it never waits on the resolver."""
from __future__ import annotations

import http.client
import socket
import threading

import pytest

from lbctl.labserver import LabHTTPServer


def test_the_server_never_asks_the_resolver_for_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # A minimal root has no /etc/hosts, so a name lookup goes to DNS; from a lab namespace
    # whose route drops it, that held the DSR lab's servers unlistening for 10 s.
    asked: list[str] = []

    def resolver(name: str = "", *args: object) -> str:
        asked.append(str(name))
        raise OSError("the lab server must not resolve names")

    monkeypatch.setattr(socket, "getfqdn", resolver)
    monkeypatch.setattr(socket, "gethostbyaddr", resolver)
    httpd = LabHTTPServer(("127.0.0.1", 0), "be7", log_requests=False)
    try:
        assert asked == []
        port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert (resp.status, resp.read(), resp.getheader("X-Backend")) == (200, b"be7\n", "be7")
        conn.close()
        assert asked == []
    finally:
        httpd.shutdown()
        httpd.server_close()
