"""Who may call a served model: a bearer token, on by default, on every address.

Why by default: a model server on `--host 0.0.0.0` with no authentication lets anyone who reaches the port
use the machine and read the model's details (TorchServe turned token authorisation on by default in 0.11
for the same reason). The user does nothing extra: `serve` generates a token once, keeps it beside the
run with mode 0600, and prints a `curl` line and a page URL carrying it in the fragment (`#token=...`),
which browsers never send to the server, so the token reaches no server log.

Where the token comes from, first found wins (`resolve_token`): the ``VISIONTUNE_TOKEN`` environment
variable, a ``--token-file``, else ``RUN/serve.token`` (made on the first start, reused after). `--no-auth`
turns the check off, explicitly. The comparison is constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from visiontune.errors import UsageError
from visiontune.files import write_secret_whole

TOKEN_ENV = "VISIONTUNE_TOKEN"
TOKEN_BYTES = 32  # 256 bits: secrets.token_urlsafe's own recommendation for tokens that guard a service
#: Endpoints anyone may call: liveness (no model details in it) and the page (it asks for the token).
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})


@dataclass(frozen=True)
class Auth:
    """The server's access rule: `token` required on every non-public endpoint, or none (`--no-auth`).
    `origin` says where the token came from (printed at start, never the token itself)."""

    token: str | None
    origin: str

    @property
    def required(self) -> bool:
        return self.token is not None

    def allows(self, authorization: str | None) -> bool:
        """True when the `Authorization` header carries this token as `Bearer <token>` (or none is required).
        Anything else — no header, `Basic ...`, a malformed bearer, a wrong token — is False, never an error."""
        if self.token is None:
            return True
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.token.encode("utf-8"))

    @classmethod
    def off(cls) -> Auth:
        return cls(None, "--no-auth: every endpoint answers without a token")

    @classmethod
    def with_token(cls, token: str, origin: str = "given") -> Auth:
        _check_token_text(token, origin)
        return cls(token, origin)


def _check_token_text(token: str, origin: str) -> None:
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise UsageError(f"the token from {origin} is empty or holds spaces or control characters; "
                         "use one line of printable characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def read_token_file(path: Path) -> str:
    """The token in `path`, refused with what to do when others may read it or it cannot be read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"{path}: token file not found; give an existing file or leave --token-file out "
                         "(serve then makes one beside the run)") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise UsageError(f"{path}: cannot read the token file ({reason}); make it readable by you alone: chmod 600 {path}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path}: the token file can be read or changed by other users (mode {stat.S_IMODE(mode):o}); "
                         f"make it yours alone: chmod 600 {path}")
    _check_token_text(text, str(path))
    return text


def resolve_token(keep_at: Path, token_file: str | Path | None = None, no_auth: bool = False,
                  environ: dict | None = None) -> tuple[Auth, list[str]]:
    """The server's `Auth` and the lines to print about it (never the token).

    `keep_at` is where a generated token is kept (``RUN/serve.token``): reused when present (its mode
    checked like a --token-file's), else made with mode 0600 from the start."""
    environ = os.environ if environ is None else environ
    if no_auth:
        return Auth.off(), ["authentication is OFF (--no-auth): anyone who reaches this port can use the model"]
    notes: list[str] = []
    from_env = environ.get(TOKEN_ENV)
    if from_env:
        if token_file is not None:
            notes.append(f"token from ${TOKEN_ENV}; --token-file {token_file} is not used (the environment wins)")
        else:
            notes.append(f"token from ${TOKEN_ENV}")
        return Auth.with_token(from_env.strip(), f"${TOKEN_ENV}"), notes
    if token_file is not None:
        return Auth(read_token_file(Path(token_file)), str(token_file)), [f"token from {token_file}"]
    keep_at = Path(keep_at)
    if keep_at.exists():
        return Auth(read_token_file(keep_at), str(keep_at)), [f"token from {keep_at} (made on an earlier start)"]
    token = secrets.token_urlsafe(TOKEN_BYTES)
    write_secret_whole(keep_at, token + "\n")
    return Auth(token, str(keep_at)), [f"new token written to {keep_at} (mode 600; reused next time)"]
