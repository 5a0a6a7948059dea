"""The model's published price and the account's balance, parsed in one place.

`GET /v1/models/{model_id}` describes a model with its `base_price_usd` per `price_unit`;
`GET https://api.runcomfy.net/prod/v2/balance` gives `{balance_usd, balance_microdollars,
currency}`, and a balance may be 0 or negative. Example::

    >>> parse_model_price({"base_price_usd": 0.025, "price_unit": "image"})
    ModelPrice(price_usd=0.025, unit='image')
    >>> parse_balance({"balance_usd": -1, "currency": "USD"}).usd
    -1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flux2_pipeline.runcomfy.errors import MalformedResponseError


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """What the service charges for one `unit` of the model's output (an image here)."""

    price_usd: float
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Balance:
    """The account's balance; one wallet pays for every RunComfy product."""

    usd: float
    currency: str = "USD"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None
        else:
            return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_model_price(body: Any) -> ModelPrice:
    """The price in a model description; `MalformedResponseError` when it has none."""
    if not isinstance(body, Mapping):
        raise MalformedResponseError("model response is not a JSON object")
    price = _number(body.get("base_price_usd"))
    if price is None or price < 0:
        raise MalformedResponseError("model response has no usable base_price_usd")
    unit = body.get("price_unit")
    return ModelPrice(price_usd=price, unit=str(unit) if unit else None)


def parse_balance(body: Any) -> Balance:
    """`balance_usd`, else `balance_microdollars` / 1e6; `MalformedResponseError` without either."""
    if not isinstance(body, Mapping):
        raise MalformedResponseError("balance response is not a JSON object")
    usd = _number(body.get("balance_usd"))
    if usd is None:
        micro = _number(body.get("balance_microdollars"))
        usd = None if micro is None else micro / 1_000_000
    if usd is None:
        raise MalformedResponseError("balance response has no balance_usd")
    currency = body.get("currency")
    return Balance(usd=usd, currency=str(currency) if currency else "USD")
