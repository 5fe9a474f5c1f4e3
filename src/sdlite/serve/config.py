"""Service configuration: what the operator sets on `sdlite serve`, with defaults for a small box."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Limits:
    """Request size caps, checked before a request is admitted (the library's own limits are wider)."""
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 4            # A1111 batch_size x n_iter, OpenAI n
    max_prompt_chars: int = 4000
    max_body_bytes: int = 1 << 20  # HTTP request body and gRPC message size


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time equality that does not reveal the length either (both sides hashed first)."""
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


@dataclass(frozen=True)
class ApiAuth:
    """Who may use the service: HTTP Basic users (`--api-auth user:pass[,user2:pass2]`, as A1111's flag)
    and bearer tokens (`--api-token TOKEN`). Empty: no authentication. `allows` checks an Authorization
    header (HTTP) or `authorization` metadata value (gRPC), comparing in constant time; every configured
    credential is compared, so the time taken says nothing about which one came close."""
    users: tuple[tuple[str, str], ...] = ()
    tokens: tuple[str, ...] = ()

    @classmethod
    def parse(cls, users: str | None = None, token: str | None = None) -> "ApiAuth":
        """From the flags' text; ValueError naming the flag for a malformed one. A password may hold ':'
        (the first one ends the user name) but not ',' (which separates the pairs)."""
        pairs = []
        for item in ([] if users is None else users.split(",")):
            user, sep, password = item.strip().partition(":")
            if not sep or not user or not password:
                raise ValueError("--api-auth: expected user:password[,user2:password2], each user and password "
                                 "non-empty")
            pairs.append((user, password))
        if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
            raise ValueError("--api-token: must be a non-empty token without spaces")
        return cls(tuple(pairs), () if token is None else (token.strip(),))

    def __bool__(self) -> bool:
        return bool(self.users or self.tokens)

    def __repr__(self) -> str:  # never the secrets (a config may be logged)
        return f"ApiAuth(users={[u for u, _ in self.users]}, tokens={len(self.tokens)})"

    def schemes(self) -> list[str]:
        """The challenges a refusal carries (`WWW-Authenticate`)."""
        return (['Basic realm="sdlite", charset="UTF-8"'] if self.users else []) + \
            (['Bearer realm="sdlite"'] if self.tokens else [])

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value ("Basic base64(user:pass)" or "Bearer TOKEN") is valid."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        ok = False
        if scheme == "basic" and self.users:
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except ValueError:
                return False
            for u, p in self.users:
                ok |= _same(user, u.encode()) & _same(password, p.encode()) & bool(sep)
        elif scheme == "bearer" and self.tokens:
            for t in self.tokens:
                ok |= _same(value.encode(), t.encode())
        return ok


@dataclass
class ServeConfig:
    model: Path | None               # None: the first model of models_dir
    vae: Path | None = None         # another VAE to decode with: a folder (e.g. TAESD) or a VAE file
    model_config: Path | None = None  # a single-file model's config folder (--config)
    lora_dir: Path | None = None    # LoRAs that requests name in <lora:NAME:SCALE> prompt tags (--lora-dir)
    embeddings_dir: Path | None = None  # textual-inversion embeddings used by name in prompts
    prediction_type: str | None = None  # overrides the model's (--prediction-type)
    host: str = "127.0.0.1"
    grpc_port: int | None = 50051   # None: no gRPC front end; 0: an ephemeral port
    http_port: int | None = 7860    # None: no HTTP front end; 0: an ephemeral port
    port_file: Path | None = None   # JSON {"grpc": port, "http": port, "pid": pid}, written when ready
    threads: int | None = None      # torch threads (default: the physical cores, see runtime.threads)
    precision: str | None = None    # compute precision (runtime.precision); None: $SDLITE_PRECISION or auto
    kv_store: str | None = None     # the text K/V store (runtime.kv_cache); None: the planner's choice
    kv_tokens: str | None = None    # "all" (None) or "eot"
    memory_budget: int | None = None  # bytes; the planner picks the levers for it (None: no plan limit)
    max_concurrency: int | None = None  # generations at once; None: from the memory plan
    queue_size: int = 4             # admitted jobs waiting for a slot (beyond the running ones)
    default_deadline: float = 300.0  # seconds, when the client sets none
    max_deadline: float = 3600.0     # a client's longer deadline is cut to this
    breaker_failures: int = 5       # consecutive failures/timeouts that open the circuit (0: never)
    breaker_cooldown: float = 30.0  # seconds open before one trial request is let through
    grace: float = 30.0             # SIGTERM/SIGINT: seconds to finish in-flight work before cancelling it
    oom_score_adj: int | None = None
    limits: Limits = field(default_factory=Limits)
    models_dir: Path | None = None  # --models-dir: the models a client may switch to (serve.models)
    auth: ApiAuth = field(default_factory=ApiAuth)  # --api-auth / --api-token (empty: open)

    def __post_init__(self):
        self.model = None if self.model is None else Path(self.model)
        self.models_dir = None if self.models_dir is None else Path(self.models_dir)
