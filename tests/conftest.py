import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different seed per test (fresh random inputs), printed on failure for reproduction
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section("call", "seed", f"torch.manual_seed({value})")


def triton_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
