import pytest
from deepseek_operator.__main__ import build_parser, main, settings_from_args
from deepseek_operator.settings import OperatorSettings, settings_from_env


def test_env_sets_scope_and_durations():
    settings = settings_from_env({"DEEPSEEK_OPERATOR_NAMESPACES": "a, b",
                                  "DEEPSEEK_OPERATOR_SIGNING_KEY_ROTATION": "2h",
                                  "DEEPSEEK_OPERATOR_VERBOSE": "true", "DEEPSEEK_OPERATOR_WORKERS": "4"})
    assert settings.namespaces == ("a", "b") and settings.signing_key_rotation == 7200
    assert settings.verbose is True and settings.workers == 4
    assert settings.rotation_policy.rotation_interval == 7200


def test_liveness_can_be_switched_off_from_env():
    assert settings_from_env({"DEEPSEEK_OPERATOR_LIVENESS_ENDPOINT": "none"}).liveness_endpoint is None


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL"):
        settings_from_env({"DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "soon"})


def test_cli_overrides_env_and_scope_must_be_explicit():
    base = settings_from_env({"DEEPSEEK_OPERATOR_NAMESPACES": "a"})
    settings = settings_from_args(build_parser().parse_args(["-A", "--retry-interval", "2s", "--liveness", "none"]),
                                  base)
    assert settings.all_namespaces and settings.namespaces == () and settings.retry_interval == 2
    assert settings.liveness_endpoint is None
    with pytest.raises(ValueError, match="choose a scope"):
        OperatorSettings().validate()


def test_main_refuses_to_start_without_a_scope(capsys, monkeypatch):
    monkeypatch.delenv("DEEPSEEK_OPERATOR_NAMESPACES", raising=False)
    monkeypatch.delenv("DEEPSEEK_OPERATOR_ALL_NAMESPACES", raising=False)
    assert main([]) == 2
    assert "--all-namespaces" in capsys.readouterr().err


def test_main_refuses_a_broken_kubeconfig_in_one_line_quoting_none_of_it(capsys, tmp_path):
    """A kubeconfig that is not YAML, not a kubeconfig or not readable is one line on stderr and exit 2 (it was a
    traceback, whose YAML error could quote the file: a token in it)."""
    broken = tmp_path / "broken"
    broken.write_text('apiVersion: v1\nusers:\n- name: u\n  user: {token: *s3cr3t-token}\n')
    listed = tmp_path / "listed"
    listed.write_text("- a\n- b\n")
    for path, message in ((broken, "the kubeconfig is not valid YAML"),
                          (listed, "the kubeconfig is not a kubeconfig"),
                          (tmp_path, "the kubeconfig could not be read")):
        assert main(["--all-namespaces", "--kubeconfig", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"deepseek-operator: {message}") and "s3cr3t" not in err and "Traceback" not in err


def test_main_refuses_a_liveness_url_it_cannot_serve_in_one_line(capsys):
    """A liveness URL without a port (or not http) was a traceback from inside the run; it is refused at start."""
    for url in ("http://0.0.0.0/healthz", "https://0.0.0.0:8080/healthz", "0.0.0.0:8080", "http://h:port/x",
                "http://:8080/healthz", "http://h:0/x"):
        assert main(["--all-namespaces", "--liveness", url]) == 2, url
        err = capsys.readouterr().err
        assert err.startswith(f"deepseek-operator: liveness endpoint {url!r}: expected http://HOST:PORT/PATH"), err
    for url in ("http://0.0.0.0:8080/healthz", "http://127.0.0.1:9/", "http://[::]:8080/healthz"):
        assert OperatorSettings(all_namespaces=True, liveness_endpoint=url).validate() is None
