import pytest
from integration_helpers import Kit

# both Lightning packages are installed in the test environment: every "both packages" test runs on each
PACKAGES = ("pytorch_lightning", "lightning.pytorch")


@pytest.fixture(params=PACKAGES, ids=["pytorch_lightning", "lightning"])
def lightning(request) -> Kit:
    return Kit(request.param)
