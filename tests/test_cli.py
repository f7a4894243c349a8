"""`dsv3 VERB`: a verb module whose packages this install lacks (the server's fastapi on the GPU image) leaves the
other verbs working and names what is missing when its verb is asked for."""

import dsv3.cli


def test_a_verb_module_missing_a_package_leaves_the_others_working(monkeypatch, capsys):
    monkeypatch.setattr(dsv3.cli, "VERB_MODULES", ["dsv3.cost", "dsv3_no_such_package.verbs"])
    assert dsv3.cli.main(["cost", "--preset", "tiny", "--tokens", "1e6", "--mfu", "0.4"]) == 0
    assert dsv3.cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no verb 'serve'" in err and "dsv3_no_such_package.verbs needs the package dsv3_no_such_package" in err
