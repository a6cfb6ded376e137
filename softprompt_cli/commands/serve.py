"""`softprompt serve`: load one frozen base model and the given soft prompts on it, then answer HTTP requests
(softprompt_cli.serving) with uvicorn until stopped."""

from __future__ import annotations

import gc
import ipaddress
import logging
import socket
from pathlib import Path

import uvicorn

from softprompt_cli.devices import inference_device
from softprompt_cli.errors import UserError
from softprompt_cli.serving.app import Settings, create_app
from softprompt_cli.serving.registry import Registry


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_address(host: str, port: int) -> None:
    """Refuse a port that is taken before loading the model (a minute for large models)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}). Choose another --port (or stop "
                            "what holds it).") from None


def read_chat_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--chat-template {str(path)!r} cannot be read as UTF-8 text ({error}). Give a Jinja "
                        "template file.") from None


def run_serve(references: list[str], host: str, port: int, model_path: str | None, settings: Settings,
              device_option: str = "auto", access_log: bool = True) -> None:
    check_address(host, port)
    if settings.admin_root is not None and not settings.admin_root.is_dir():
        raise UserError(f"--admin-root {str(settings.admin_root)!r} is not a folder. Give the folder that hot-loaded "
                        "checkpoints must lie under.")
    log = logging.getLogger("softprompt.serve")
    if not _is_loopback(host) and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the server.", host)
    registry = Registry(references, model_path, inference_device(device_option))
    app = create_app(registry, settings)
    print(f"serving {len(registry.names())} soft prompt(s) on {registry.base_name} ({registry.device}): "
          f"{', '.join(registry.names())}", flush=True)
    # Loading leaves ~400k long-lived objects (modules, tensors, tokenizer); a full collection then walked all of
    # them and stopped the server for ~0.4 s. Frozen, they are never scanned again.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, timeout_graceful_shutdown=10)
