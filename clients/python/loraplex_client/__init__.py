"""loraplex_client: a torch-free Python client (sync, async, streaming, adapter admin) for loraplex.

from loraplex_client import Client

with Client(api_key="lpx-...") as client:
    client.upload("pirate", "path/to/peft-dir")
    print(client.completions("pirate", "Ahoy", max_tokens=16, temperature=0).text)
"""

from loraplex_client._base import RetryPolicy
from loraplex_client._version import __version__
from loraplex_client.async_client import AsyncClient
from loraplex_client.client import Client
from loraplex_client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    InvalidAdapterError,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    TimeoutError,
)
from loraplex_client.streaming import AsyncStream, Stream
from loraplex_client.types import (
    Adapter,
    AdapterDeleted,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    Usage,
)

__all__ = [
    "Adapter",
    "AdapterDeleted",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Client",
    "Completion",
    "CompletionChunk",
    "ConflictError",
    "ConnectionError",
    "InvalidAdapterError",
    "LoraplexError",
    "Model",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "Stream",
    "TimeoutError",
    "Usage",
    "__version__",
]
