"""Service configuration: what the operator sets on `sdlite serve`, with defaults for a small box."""

from __future__ import annotations

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


@dataclass
class ServeConfig:
    model: Path
    vae: Path | None = None         # another VAE to decode with: a folder (e.g. TAESD) or a VAE file
    model_config: Path | None = None  # a single-file model's config folder (--config)
    prediction_type: str | None = None  # overrides the model's (--prediction-type)
    host: str = "127.0.0.1"
    grpc_port: int | None = 50051   # None: no gRPC front end; 0: an ephemeral port
    http_port: int | None = 7860    # None: no HTTP front end; 0: an ephemeral port
    port_file: Path | None = None   # JSON {"grpc": port, "http": port, "pid": pid}, written when ready
    threads: int | None = None      # torch threads (default: the physical cores, see runtime.threads)
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

    def __post_init__(self):
        self.model = Path(self.model)
