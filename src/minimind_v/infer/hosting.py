"""What `web` and `serve` share: the name a model is served under, and a port checked before anything loads."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from minimind_v.errors import UserError


def served_name(model_dir: str, chosen: str | None = None) -> str:
    """The model's name in the API and the page title: `chosen`, else the directory's name, or its parent's
    when the directory is called model (runs/quickstart/model -> quickstart)."""
    if chosen:
        return chosen
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds it), or one line saying why it cannot be."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host} (another server? choose another --port)") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock


def check_port_free(host: str, port: int) -> None:
    """For servers that bind their own socket (Gradio): fail now, with one line, rather than after loading."""
    listen_socket(host, port).close()
