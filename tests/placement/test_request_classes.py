"""Request classes: a tenant's default, its ceiling, OpenAI's service tiers, clear errors."""

from __future__ import annotations

import pytest

from tierflow.placement.classes import CLASS_RANK, resolve_class
from tierflow.placement.tenants import TenantConfigError, TenantDirectory
from tierflow.runtime.errors import InvalidRequest, PermissionDenied


def _tenant(**policy: object):
    directory = TenantDirectory.from_config({"tenants": [{"name": "acme", "api_keys": ["sk-acme-test-key"], **policy}]})
    return directory.get("acme")


def test_default_class_and_the_ceiling() -> None:
    tenant = _tenant(request_class="standard", max_class="interactive", weight=3)
    assert tenant.weight == 3
    assert tenant.request_class(None) == "standard"
    assert tenant.request_class("interactive") == "interactive"
    assert tenant.request_class("batch") == "batch"
    assert tenant.request_class("priority") == "interactive"  # OpenAI's tiers map onto classes
    assert tenant.request_class("flex") == "batch"
    assert tenant.request_class("auto") == "standard"


def test_asking_above_the_allowance_is_a_403_naming_both() -> None:
    tenant = _tenant(request_class="batch")
    with pytest.raises(PermissionDenied) as caught:
        tenant.request_class("interactive")
    assert caught.value.http_status == 403 and caught.value.code == "request_class_not_allowed"
    assert "'interactive'" in caught.value.message and "'batch'" in caught.value.message


def test_unknown_class_is_a_400_listing_the_choices() -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_class("urgent", "standard", "standard", param="x-tierflow-class")
    assert caught.value.param == "x-tierflow-class" and "interactive" in caught.value.message


def test_ceiling_below_default_is_a_configuration_error() -> None:
    with pytest.raises(TenantConfigError, match="max_class 'batch' is below request_class 'standard'"):
        _tenant(max_class="batch")


def test_ranks_are_strict_priority_order() -> None:
    assert CLASS_RANK["interactive"] < CLASS_RANK["standard"] < CLASS_RANK["batch"]
