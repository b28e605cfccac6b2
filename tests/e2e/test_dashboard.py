"""The dashboard in a real browser (Debian's chromium driven by Playwright) against the real platform.

A user signs up, uploads a sample CSV, starts a session, watches the curves grow to COMPLETED and
downloads the model; nothing the pages load comes from another origin. Screenshots of each step, on a
laptop-sized and a phone-sized screen, go to var/screenshots/ (git-ignored).
"""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from settings import ROOT
from tests.e2e.browsing import LAPTOP, PHONE, Visit
from tests.e2e.dropping_proxy import DroppingProxy

pytestmark = pytest.mark.e2e

DIGITS = ROOT / "samples" / "digits.csv"
EPOCHS = 10
# Epochs of the session the first test watches grow: batches of 4 on digits, a few seconds on this machine.
WATCHED = 40


def test_a_user_signs_up_starts_a_session_watches_it_and_downloads_the_model(platform, two_peers, browser):
    visit = Visit(browser, platform.base_url, LAPTOP)
    page = visit.page
    try:
        page.goto(platform.base_url + "/")
        page.wait_for_selector("form#signin")
        visit.shot("laptop-1-signin")
        page.click("text=Sign up")
        name = f"web{uuid.uuid4().hex[:6]}"
        page.fill("input[name=username]", name)
        page.fill("input[name=email]", f"{name}@example.com")
        page.fill("input[name=password]", "correct horse")
        page.click("button[type=submit]")
        page.wait_for_selector("text=No sessions yet")

        page.click("nav >> text=New session")
        # A file the server would refuse: its own message, and no way to start.
        page.set_input_files("input[type=file]", files=[{"name": "bad.csv", "mimeType": "text/csv",
                                                          "buffer": b"a;b;label\n1;2;0\n3;4;1\n"}])
        page.wait_for_selector("#preview .alert")
        assert "';' as the separator: use commas" in page.inner_text("#preview .alert")
        assert page.is_disabled("button:has-text('Start training')")
        page.set_input_files("input[type=file]", str(DIGITS))
        # The server's reading of the file: its rows, classes and first rows.
        page.wait_for_selector("#preview table")
        assert "1,797 rows" in page.inner_text("#preview") or "1797 rows" in page.inner_text("#preview")
        # Its target, the last of 65 columns, is in sight: the rows are scrolled to it.
        box = page.evaluate("""() => { const rows = document.querySelector('#preview .scroll');
            const a = rows.getBoundingClientRect(), t = rows.querySelector('th.target').getBoundingClientRect();
            return [a.left, a.right, t.left, t.right]; }""")
        assert box[0] <= box[2] and box[3] <= box[1] + 1, box  # (within a pixel: borders round)
        assert "10 classes" in page.inner_text("#preview")
        assert page.input_value("select[name=target]") == "label"
        page.fill("input[name=num_peers]", "2")
        assert page.is_visible("#search-settings")  # a sweep searches unless the user picks its settings
        page.check("input[name=sweep_style][value=fixed]")
        assert page.is_hidden("#search-settings")
        page.check("input[name=per_peer]")
        rows = page.locator("table.per-peer tbody tr")
        assert rows.count() == 2
        for row, lr in zip(range(2), ("0.01", "0.001"), strict=True):
            rows.nth(row).locator("input[name=learning_rate]").fill(lr)
            rows.nth(row).locator("input[name=epochs]").fill(str(WATCHED))
            rows.nth(row).locator("input[name=batch_size]").fill("4")  # slow enough to watch the curves grow
            rows.nth(row).locator("input[name=hidden]").fill("64")
        visit.shot("laptop-2-new-session")
        page.click("button:has-text('Start training')")

        page.wait_for_selector("#status")
        session_id = page.url.rsplit("/", 1)[1]
        page.wait_for_selector(".chart:not([data-points='0'])")
        # How long it has run, and about how long is left, from the epochs done in that time.
        page.wait_for_selector("#timing:has-text('left')")
        assert page.inner_text("#timing").startswith("running for ")
        visit.shot("laptop-3-session-running")
        page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
        page.wait_for_selector(f".chart[data-points='{WATCHED}']")
        visit.shot("laptop-4-session-completed")

        # The curves grew as the stream delivered the epochs, not in one piece at the end.
        counts = page.evaluate("window.__points")
        assert any(0 < count < WATCHED for count in counts) and counts[-1] == WATCHED, counts
        table = page.inner_text("#peer-runs")
        for peer in two_peers:
            assert peer in table
        assert table.count("COMPLETED") == 2 and table.count(f"epoch {WATCHED}/{WATCHED}") == 2
        assert "Result best peer" in page.inner_text("#results")
        assert page.inner_text("#timing").startswith("ran ")
        # Validation drawn dashed, and so shown in the legend (hollow, dashed), training filled.
        markers = [m.get_attribute("style") or "" for m in page.query_selector_all(".u-marker")]
        assert sum("dashed" in m and "transparent" in m for m in markers) >= 4, markers  # 2 peers × 2 charts
        assert sum("solid" in m and "transparent" not in m for m in markers) >= 4, markers
        page.check("input.log-scale")  # the loss on a log scale: drawn again, every point still there
        page.wait_for_selector(f".chart[data-scale=log][data-points='{WATCHED}']")

        with page.expect_download() as download:
            page.click("#download")
        saved = download.value.path().read_bytes()
        token = json.loads(page.evaluate("localStorage.getItem('peertrain.auth')"))["token"]
        served = requests.get(f"{platform.base_url}/sessions/{session_id}/model",
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert saved == served.content and len(saved) > 1000

        page.click("nav >> text=Sessions")
        page.wait_for_selector("#sessions tbody tr")
        assert "COMPLETED" in page.inner_text("#sessions")
        result = page.inner_text("#sessions tbody tr td.outcome")
        assert result.startswith("accuracy ") and result.endswith("%"), result
        visit.shot("laptop-5-sessions")
        page.click("nav >> text=Peers")
        page.wait_for_selector("#peers tbody tr td[data-reputation]")
        visit.shot("laptop-6-peers")
        visit.check("status of 400")  # the refused bad.csv's preview, which the browser notes too

        # The same session on a phone: replayed from its start, readable without zooming.
        phone = Visit(browser, platform.base_url, PHONE, mobile=True, token=token)
        try:
            phone.page.goto(f"{platform.base_url}/#/sessions/{session_id}")
            phone.page.wait_for_selector("#status[data-status=COMPLETED]")
            phone.page.wait_for_selector(f".chart[data-points='{WATCHED}']")
            width = phone.page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px screen"
            phone.shot("phone-1-session")
            phone.page.click("nav >> text=New session")
            phone.page.set_input_files("input[type=file]", str(DIGITS))
            phone.page.wait_for_selector("#preview table")
            assert phone.page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            phone.shot("phone-2-new-session")
            phone.check()
        finally:
            phone.close()
    finally:
        visit.close()


def test_a_search_started_from_the_form_shows_its_trials_ranked_curved_and_scattered(platform, two_peers, browser):
    user = platform.user()
    visit = Visit(browser, platform.base_url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    page = visit.page
    try:
        page.goto(platform.base_url + "/#/new")
        page.set_input_files("input[type=file]", str(DIGITS))
        page.wait_for_selector("#preview table")
        page.fill("input[name=num_peers]", "2")
        space = {"learning_rate": {"low": 0.0003, "high": 0.03, "log": True}, "batch_size": [16, 64],
                 "hidden": [[32], [64]], "epochs": 9}
        page.fill("textarea[name=search]", json.dumps(space))
        page.fill("input[name=trials]", "8")
        visit.shot("laptop-7-new-search")
        page.click("button:has-text('Start training')")
        page.wait_for_selector("#status")
        assert "search of 8 trials (TPE sampler, successive halving pruning)" in page.inner_text(".facts")
        page.wait_for_selector("#trials tbody tr")
        page.wait_for_selector("#status[data-status=COMPLETED]", timeout=180_000)
        page.wait_for_selector("#trials tbody tr:nth-child(8)")
        page.wait_for_selector("#winner:has-text('Best trial')")
        visit.shot("laptop-8-search-completed")
        session_id = page.url.rsplit("/", 1)[1]
        listed = user.get(f"/sessions/{session_id}/trials").json()
        best = listed["best"]
        # Why the winner won: its score on the held-out rows, and against the next one or its tie.
        winner = page.inner_text("#winner")
        assert f"Best trial: trial {best['number']}" in winner and f"at epoch {best['best_epoch']}" in winner
        assert "tie" in winner
        # Ranked by score by default, the winner starred and first; a click sorts by another column.
        rows = page.locator("#trials tbody tr")
        # The table follows the trials' last events: ranked, the winner first once the last of them is shown.
        page.wait_for_selector(f"#trials tbody tr:first-child[data-trial='{best['number']}']")
        assert "★" in rows.first.inner_text() and rows.first.get_attribute("class") == "best"
        statuses = {t["number"]: t["status"] for t in listed["items"]}
        assert "PRUNED" in statuses.values()
        page.click("#trials th button[data-key=number]")
        assert [rows.nth(i).get_attribute("data-trial") for i in range(8)] == [str(n) for n in range(8)]
        assert [rows.nth(i).get_attribute("data-status") for i in range(8)] == [statuses[n] for n in range(8)]
        # Every trial's curve on one chart, as far as it trained; a point per scored trial on the scatter.
        assert page.get_attribute("#trials-card .chart", "data-points") == "9"
        assert page.locator("#scatter circle.point").count() == 8
        assert page.locator("#scatter circle.pruned").count() == list(statuses.values()).count("PRUNED")
        page.select_option("#scatter-param", "batch_size")
        assert page.locator("#scatter circle.point").count() == 8
        assert "best trial" in page.inner_text("#results")
        visit.check()
    finally:
        visit.close()


def test_a_session_page_resumes_its_stream_after_the_connection_drops(platform, two_peers, browser):
    user = platform.user()
    hp = json.dumps({"learning_rate": 0.01, "epochs": EPOCHS, "batch_size": 4, "hidden": [64]})
    started = user.start(DIGITS, num_peers=2, hyperparameters=hp)
    assert started.status_code == 202, started.text
    session_id = started.json()["session_id"]
    proxy = DroppingProxy(int(platform.base_url.rsplit(":", 1)[1]), after=2000)
    visit = Visit(browser, proxy.url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    resumed_after = []

    def stream_opened(route) -> None:
        resumed_after.append(route.request.all_headers().get("last-event-id"))
        route.continue_()

    visit.page.route("**/events", stream_opened)
    try:
        visit.page.goto(f"{proxy.url}/#/sessions/{session_id}")
        visit.page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
        visit.page.wait_for_selector(f".chart[data-points='{EPOCHS}']")
        assert proxy.cuts == 1
        # Reopened once, asking for what follows the last event it had whole; the server replays the rest.
        assert resumed_after == [None, proxy.last_complete_event_id()]
        assert visit.page.inner_text("#peer-runs").count(f"epoch {EPOCHS}/{EPOCHS}") == 2
        visit.shot("laptop-9-session-resumed")
        visit.check("net::ERR_INCOMPLETE_CHUNKED_ENCODING")  # the browser's own note of the cut
    finally:
        visit.close()
        proxy.close()


def test_a_session_page_says_disconnected_within_two_seconds_of_its_stream_going_silent(platform, two_peers,
                                                                                        browser):
    """The link goes silent (nothing more arrives, nothing is closed, as when a server hangs): the page says so
    within two seconds, gives the stream up and asks again after the last event it had, long before the silent
    connection would end by itself."""
    import time

    user = platform.user()
    hp = json.dumps({"learning_rate": 0.01, "epochs": EPOCHS, "batch_size": 4, "hidden": [64]})
    session_id = user.start(DIGITS, num_peers=2, hyperparameters=hp).json()["session_id"]
    proxy = DroppingProxy(int(platform.base_url.rsplit(":", 1)[1]), after=2000, linger=30)
    visit = Visit(browser, proxy.url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    asked_after = []
    visit.page.route("**/events", lambda route: (asked_after.append(route.request.all_headers().get("last-event-id")),
                                                 route.continue_()))
    try:
        visit.page.goto(f"{proxy.url}/#/sessions/{session_id}")
        visit.page.wait_for_selector("#connection.disconnected", timeout=30_000)
        noticed = time.monotonic() - proxy.cut_at
        assert noticed <= 2.5, f"it took {noticed:.2f} s to say the stream was gone"
        assert visit.page.inner_text("#connection") == "disconnected — reconnecting…"
        visit.shot("laptop-8-disconnected")
        visit.page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
        visit.page.wait_for_selector(f".chart[data-points='{EPOCHS}']")
        assert time.monotonic() - proxy.cut_at < 30  # not waiting for the silent connection to end
        assert asked_after == [None, proxy.last_complete_event_id()]
    finally:
        visit.close()
        proxy.close()


def test_a_federated_session_draws_the_global_model_round_by_round(platform, two_peers, browser):
    user = platform.user()
    rounds, local = 3, 2
    started = user.start(DIGITS, num_peers=2, mode="federated", rounds=rounds, local_epochs=local,
                         hyperparameters=json.dumps({"learning_rate": 0.003, "hidden": [64]}))
    assert started.status_code == 202, started.text
    session_id = started.json()["session_id"]
    visit = Visit(browser, platform.base_url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    try:
        visit.page.goto(f"{platform.base_url}/#/sessions/{session_id}")
        visit.page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
        # A point per round for the global model, and the peers' local epochs between rounds.
        visit.page.wait_for_selector(f".chart[data-points='{rounds * local}']")
        assert "global model (val)" in visit.page.inner_text(".charts")
        assert visit.page.inner_text("#peer-runs").count(f"round {rounds}/{rounds} · epoch {local}/{local}") == 2
        assert "Result global model: val_accuracy" in visit.page.inner_text("#results")
        visit.shot("laptop-8-federated")
        visit.check()
    finally:
        visit.close()


def test_an_asynchronous_session_draws_the_global_model_version_by_version(platform, two_peers, browser):
    user = platform.user()
    started = user.start(DIGITS, num_peers=2, mode="federated", schedule="async", buffer_size=1, max_updates=4,
                         local_epochs=2, hyperparameters=json.dumps({"learning_rate": 0.003, "hidden": [64]}))
    assert started.status_code == 202, started.text
    session_id = started.json()["session_id"]
    visit = Visit(browser, platform.base_url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    try:
        visit.page.goto(f"{platform.base_url}/#/sessions/{session_id}")
        visit.page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
        page = visit.page.inner_text("main")
        assert "Global model, version by version" in page
        assert "async: 4 updates of 2 local epochs, folded 1 at a time" in page
        # Each peer's last task, by its number among the session's four.
        runs = visit.page.inner_text("#peer-runs")
        assert runs.count(" · epoch 2/2") == 2 and "update 4 · epoch 2/2" in runs, runs
        assert "Result global model: val_accuracy" in visit.page.inner_text("#results")
        visit.shot("laptop-9-asynchronous")
        visit.check()
    finally:
        visit.close()


def test_a_page_outlives_its_access_token_and_an_expired_sign_in_says_so(platform, browser):
    """The access token expires while a page is open: the refresh token renews it unseen. Once the refresh token
    has expired too, the page goes to the sign-in form, which says why."""
    from datetime import timedelta

    from flask_jwt_extended import create_access_token, create_refresh_token

    from models import User

    user = platform.user()
    with platform.platform.api.app_context():
        account = User.objects.get(email=user.email)
        expired = create_access_token(identity=account, expires_delta=timedelta(seconds=-1))
        refresh_expired = create_refresh_token(identity=account, expires_delta=timedelta(seconds=-1))
    # The tests' and benches' own client renews the same way (a bench may run for more than an hour).
    user.http.headers["Authorization"] = f"Bearer {expired}"
    assert user.get("/sessions").status_code == 200 and expired not in user.http.headers["Authorization"]
    visit = Visit(browser, platform.base_url, LAPTOP, token=expired, refresh=user.refresh_token)
    try:
        visit.page.goto(f"{platform.base_url}/#/sessions")
        visit.page.wait_for_function("(old) => JSON.parse(localStorage.getItem('peertrain.auth')).token !== old",
                                     arg=expired)
        visit.page.wait_for_selector("table#sessions", state="attached")
        assert visit.page.url.endswith("#/sessions")
        kept = json.loads(visit.page.evaluate("localStorage.getItem('peertrain.auth')"))
        assert kept["token"] != expired and kept["refresh"] == user.refresh_token
        visit.check("401")  # the browser's own note of the refused first request
    finally:
        visit.close()
    visit = Visit(browser, platform.base_url, LAPTOP, token=expired, refresh=refresh_expired)
    try:
        visit.page.goto(f"{platform.base_url}/#/sessions")
        visit.page.wait_for_selector("#signin .alert")
        assert visit.page.inner_text("#signin .alert") == "your sign-in expired; sign in again"
        assert visit.page.url.endswith("#/signin")
        visit.shot("laptop-sign-in-expired")
    finally:
        visit.close()


def test_a_session_page_across_make_run_stopping_and_starting_again(browser, tmp_path):
    """`make run` stops (SIGTERM, as Ctrl-C) while a session page follows a training session: the page says
    the server stopped, and when `make run` is back on the same address it reconnects, shows the session
    INTERRUPTED, the user still signed in; its Resume button takes it on to COMPLETED."""
    import os

    from harness.http import Api
    from harness.processes import free_port, make_target
    from harness.waiting import wait_until

    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2", DATA_DIR=str(tmp_path / "data"))
    port = free_port()
    with make_target("run", env, tmp_path / "first.log", port=port) as base:
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the two local peers")
        long = json.dumps({"learning_rate": 0.001, "epochs": 1000})
        session_id = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=long).json()["session_id"]
        visit = Visit(browser, base, LAPTOP, token=user.http.headers["Authorization"].split()[1],
                      refresh=user.refresh_token)
        visit.page.goto(f"{base}/#/sessions/{session_id}")
        visit.page.wait_for_selector("#connection.live")
        wait_until(lambda: len(user.heartbeats(session_id)) >= 4, 60, "both peers to be training")
    try:
        visit.page.wait_for_selector("#connection.server-stopped")
        assert visit.page.inner_text("#connection") == "server stopped — reconnecting…"
        visit.shot("laptop-server-stopped")
        with make_target("run", env, tmp_path / "second.log", port=port):
            visit.page.wait_for_selector("#status[data-status=INTERRUPTED]")
            assert "make run was stopped" in visit.page.inner_text("main")
            visit.page.wait_for_selector("#connection.ended", state="attached")
            assert visit.page.url.endswith(f"#/sessions/{session_id}")  # still signed in
            visit.shot("laptop-session-interrupted")
            # Resume: it goes on from its peers' checkpoints, and the page follows it to its end.
            wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the peers, back")
            visit.page.click("#resume")
            visit.page.wait_for_selector("#connection.live")
            visit.page.wait_for_selector("#status[data-status=COMPLETED]", timeout=120_000)
            assert visit.page.query_selector("#resume") is None
            assert user.session(session_id)["resumes"] == 1
    finally:
        visit.close()


def test_the_api_docs_render_offline(platform, browser):
    visit = Visit(browser, platform.base_url, LAPTOP)
    try:
        visit.page.goto(platform.base_url + "/docs")
        visit.page.wait_for_selector(".swagger-ui .info .title")
        visit.page.get_by_text("/sessions/{session_id}/events", exact=True).first.wait_for()
        visit.shot("laptop-docs")
        visit.check()
    finally:
        visit.close()


def test_add_a_machine_shows_the_one_line_join_command_and_the_owner_manages_the_peer(platform, browser):
    user = platform.user()
    visit = Visit(browser, platform.base_url, LAPTOP, token=user.http.headers["Authorization"].split()[1])
    page = visit.page
    name = f"desk{uuid.uuid4().hex[:6]}"
    try:
        page.goto(platform.base_url + "/#/peers")
        page.click("#add-machine-button")
        page.fill("input[name=peer_name]", name)
        page.click("#add-machine button[type=submit]")
        page.wait_for_selector("#join-command")
        command = page.inner_text("#join-command")
        assert command.startswith(f"peertrain peer join --url {platform.base_url} --token ptj_")
        assert command.endswith("&& peertrain peer run")
        visit.shot("laptop-9-add-a-machine")
        # Its own row: the owner pauses, shares and removes it from there.
        row = f"#peers tbody tr[data-peer='{name}']"
        page.wait_for_selector(f"{row} >> text=(you)")
        page.click(f"{row} >> text=Pause")
        page.wait_for_selector(f"{row} >> text=paused")
        assert user.get(f"/peers/{name}").json()["paused"] is True
        page.click(f"{row} >> text=Share with everyone")
        page.wait_for_selector(f"{row} >> text=Stop sharing")
        assert user.get(f"/peers/{name}").json()["public"] is True
        page.click(f"{row} >> [data-action=remove]")
        page.wait_for_selector(row, state="detached")
        assert user.get(f"/peers/{name}").status_code == 404
        # The new-session form starts on anyone's shared peers, or only the user's own.
        page.goto(platform.base_url + "/#/new")
        page.wait_for_selector("select[name=pool] option[value=mine]", state="attached")
        assert page.eval_on_selector("select[name=pool]", "s => s.value") == "public"
        visit.check()
    finally:
        visit.close()
