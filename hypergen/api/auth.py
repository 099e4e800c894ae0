"""Optional API-key auth: `Authorization: Bearer <key>`, compared in constant time, never logged."""

from __future__ import annotations

import hmac
import logging

from ..errors import OpenAIError

logger = logging.getLogger("hypergen.auth")


class ApiKeyAuth:
    """Checks bearer keys against `HYPERGEN_API_KEYS`; with no keys configured, auth is off."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def warn_if_open(self) -> None:
        """Auth off is fine on a laptop; on a reachable port it hands out the admin API too."""
        if not self._keys:
            logger.warning(
                "API keys are off (HYPERGEN_API_KEYS is not set): anyone who can reach this port can "
                "generate images and load or unload LoRA adapters through /v1/loras"
            )

    def check(self, authorization: str | None) -> str | None:
        """The caller's key (for per-key rate limits), or None with auth off; raises a 401."""
        if not self._keys:
            return None
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        candidate = presented.strip().encode()
        # Compare against every key without an early exit, so timing reveals neither key nor index.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return presented.strip()
