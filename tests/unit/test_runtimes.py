import pytest

from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution.runtimes import CPP_BINARY, main_file_name, plan_for, resolve_runtime


@pytest.mark.parametrize(
    ("name", "expected"),
    [("python", "python"), ("Python3", "python"), ("cpp", "cpp"), ("c++", "cpp"), (" C++ ", "cpp")],
)
def test_resolve_runtime(name, expected):
    assert resolve_runtime(name) == expected


@pytest.mark.parametrize("name", ["", None, "java", "c", "python2"])
def test_unknown_runtime_is_rejected(name):
    with pytest.raises(RunRejected, match="unknown runtime"):
        resolve_runtime(name)


def test_python_plan():
    plan = plan_for("python", {"main.py", "util.py"})
    assert plan.compile is None and plan.run == ["python3", "main.py"]
    with pytest.raises(RunRejected, match=r"main\.py"):
        plan_for("python", {"app.py"})


def test_cpp_plans():
    plan = plan_for("cpp", {"main.cpp"})
    assert plan.compile == ["g++", "-O2", "-std=c++17", "-static", "-o", CPP_BINARY, "main.cpp"]
    assert plan.run == [CPP_BINARY]
    assert plan_for("cpp", {"run.sh", "main.cpp"}).run == ["bash", "run.sh"]
    assert plan_for("cpp", {"run.sh", "main.cpp"}).compile is None
    with pytest.raises(RunRejected):
        plan_for("cpp", {"main.c"})


def test_single_file_names():
    assert main_file_name("python", "solution.py") == "main.py"
    assert main_file_name("cpp", "a.cc") == "main.cpp"
    assert main_file_name("cpp", "build.sh") == "run.sh"
