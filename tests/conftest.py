import os

import pytest

# Nothing in the tests may reach a model hub; transformers reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def gearshift_home(tmp_path_factory):
    """$GEARSHIFT_HOME for the whole run: the caller's if set, else a fresh temporary directory
    (the default model is then pulled into it), so tests never touch ~/.cache/gearshift."""
    if os.environ.get("GEARSHIFT_HOME"):
        yield os.environ["GEARSHIFT_HOME"]
        return
    home = str(tmp_path_factory.mktemp("gearshift-home"))
    os.environ["GEARSHIFT_HOME"] = home
    try:
        yield home
    finally:
        os.environ.pop("GEARSHIFT_HOME", None)


@pytest.fixture(scope="session")
def llm(gearshift_home):
    """The default model as users get it (int4 + int8 LM head), shared by every test module."""
    import gearshift

    return gearshift.load()


@pytest.fixture(scope="session")
def exact(gearshift_home):
    """The default model with float32 weights: the mode with no bf16 rounding to amplify differences."""
    import gearshift

    return gearshift.load(weights="float32")
