"""The report's configuration table lists each key once, with its resolved value."""

from __future__ import annotations

from dpfl.shared.report.build import write_report
from dpfl.shared.rundir import RunDir


def test_resolved_key_is_listed_once_with_its_value(tmp_path):
    run = RunDir(tmp_path / "run")
    # FedConfig carries an empty base_fingerprint placeholder; the run resolves it
    run.write_config({"num_rounds": 3, "base_fingerprint": ""}, base_fingerprint="sha256:abc")
    run.log(step=1, loss=0.5)
    write_report(run.path)
    md = (run.path / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if "base_fingerprint" in line]
    assert rows == ["| base_fingerprint | sha256:abc |"]
    assert "| num_rounds | 3 |" in md


def test_html_is_the_markdown_rendered_with_text_escaped_and_images_embedded(tmp_path):
    import base64

    import numpy as np

    from dpfl.shared.edge.grid import save_grid
    from dpfl.shared.report.render import Doc, write_doc

    png = save_grid(np.zeros((1, 1, 4, 4)), tmp_path / "g.png", nrow=1)
    doc = Doc("t")
    doc.h("Sites")
    doc.p("a site named `<script>alert(1)</script>`")
    doc.p("careful", note=True)
    doc.table(["site", "reason"], [["<img src=x onerror=alert(1)>", "a | b"]])
    doc.image(png, "grid")
    html = write_doc(doc, tmp_path / "out").read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<td>a | b</td>" in html and "<th>site</th>" in html
    assert "<blockquote>" in html and "<h2>Sites</h2>" in html
    embedded = base64.b64encode(png.read_bytes()).decode()
    assert f'<img src="data:image/png;base64,{embedded}" alt="grid"' in html


def test_every_report_states_what_the_guarantee_covers_and_does_not(tmp_path):
    from dpfl.shared.privacy.guarantee import COVERS, DOES_NOT_COVER

    from .test_report import federated_run

    run, _ = federated_run(tmp_path)
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "What it does not cover:" in md
    for line in (*COVERS, *DOES_NOT_COVER):
        assert f"- {line}" in md
    assert "silo size" in " ".join(DOES_NOT_COVER)


def test_a_live_document_reloads_itself_and_a_plain_one_does_not(tmp_path):
    from dpfl.shared.report.render import Doc, write_doc

    live = Doc("t", refresh_s=15)
    live.p("x")
    html = write_doc(live, tmp_path / "live").read_text()
    assert '<head><meta charset="utf-8"><meta http-equiv="refresh" content="15">' in html
    assert "refresh" not in write_doc(Doc("t"), tmp_path / "plain").read_text()
