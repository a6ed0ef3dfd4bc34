"""Evaluate deploy/grafana/reasonalloc.json's panels against a Prometheus the way Grafana does:
template variables substituted, each target run as an instant or a range query, results turned
into data frames (table format: Time, one column per label, Value), then the panel's
transformations applied in order.

Frames are dicts {"name": str, "fields": [{"name", "type", "values", "labels"}]}. Transformations
implemented: organize (excludeByName, renameByName), convertFieldType (number, string) and sortBy
(first sort entry), with Grafana's semantics (packages/grafana-data/src/transformations/
transformers/*.ts); any other id raises, so a panel can not silently skip one."""
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "reasonalloc.json")


def load_dashboard(path=DASHBOARD):
    with open(path) as f:
        return json.load(f)


def instantiate(expr, variables, rate_interval="1m"):
    """Grafana's substitution for a Prometheus query: $var -> the variable's regex value."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unsubstituted variables {leftover} in {expr}"
    return expr


def is_instant(panel, target):
    if "instant" in target or "range" in target:
        return bool(target.get("instant")) and not target.get("range", False)
    return False


def legend(fmt, labels):
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__") + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def table_frame(result, ref_id, multiple_targets):
    """Grafana's table format of an instant vector: Time, the labels (sorted), Value."""
    names = sorted({k for s in result for k in s["metric"] if k != "__name__"})
    value_name = f"Value #{ref_id}" if multiple_targets else "Value"
    fields = [{"name": "Time", "type": "time", "values": [s["value"][0] * 1000 for s in result]}]
    for n in names:
        fields.append({"name": n, "type": "string", "values": [s["metric"].get(n, "") for s in result]})
    fields.append({"name": value_name, "type": "number", "values": [float(s["value"][1]) for s in result]})
    return {"name": ref_id, "fields": fields}


def series_frames(result, target, instant):
    frames = []
    for s in result:
        points = [s["value"]] if instant else s["values"]
        frames.append({"name": legend(target.get("legendFormat"), s["metric"]), "fields": [
            {"name": "Time", "type": "time", "values": [p[0] * 1000 for p in points]},
            {"name": "Value", "type": "number", "values": [float(p[1]) for p in points],
             "labels": {k: v for k, v in s["metric"].items() if k != "__name__"}}]})
    return frames


def query_panel(prom, panel, variables, time_range=None, step=2, at=None):
    """The panel's frames before transformations. time_range = (start, end) for range targets;
    instant targets (and all targets when time_range is None) are evaluated at `at` (default now)."""
    frames = []
    targets = panel["targets"]
    for target in targets:
        expr = instantiate(target["expr"], variables)
        instant = is_instant(panel, target) or time_range is None
        if instant:
            result = prom.query(expr, at if at is not None else (time_range[1] if time_range else None))
        else:
            result = prom.query_range(expr, time_range[0], time_range[1], step)
        if target.get("format") == "table" and instant:
            frames.append(table_frame(result, target["refId"], len(targets) > 1))
        else:
            frames.extend(series_frames(result, target, instant))
    return frames


def _organize(frames, options):
    exclude = {k for k, v in options.get("excludeByName", {}).items() if v}
    rename = options.get("renameByName", {})
    return [dict(f, fields=[dict(x, name=rename.get(x["name"], x["name"])) for x in f["fields"]
                            if x["name"] not in exclude]) for f in frames]


def _to_number(v):
    if v is None or v == "":
        return None
    if isinstance(v, str):
        v = v.replace(",", "")
    try:
        n = float(v)
    except (TypeError, ValueError):
        return None
    return n if n == n and n not in (float("inf"), float("-inf")) else None


def _convert(frames, options):
    out = []
    for f in frames:
        fields = []
        for x in f["fields"]:
            for c in options.get("conversions", []):
                if c.get("targetField") == x["name"]:
                    if c.get("destinationType") == "number":
                        x = dict(x, type="number", values=[_to_number(v) for v in x["values"]])
                    elif c.get("destinationType") == "string":
                        x = dict(x, type="string", values=[None if v is None else
                                                           (format(v, "g") if isinstance(v, float) else str(v))
                                                           for v in x["values"]])
                    else:
                        raise NotImplementedError(f"convertFieldType to {c.get('destinationType')}")
            fields.append(x)
        out.append(dict(f, fields=fields))
    return out


def _sort(frames, options):
    sort = options.get("sort") or []
    if not sort:
        return frames
    key, desc = sort[0]["field"], bool(sort[0].get("desc"))
    out = []
    for f in frames:
        idx = next((i for i, x in enumerate(f["fields"]) if x["name"] == key), None)
        if idx is None:
            out.append(f)
            continue
        col = f["fields"][idx]["values"]
        # Grafana sorts numbers numerically and strings as strings; nulls last.
        order = sorted(range(len(col)), key=lambda i: (col[i] is None, col[i] if col[i] is not None else 0),
                       reverse=False)
        if desc:
            order = [i for i in reversed(order) if col[i] is not None] + [i for i in order if col[i] is None]
        out.append(dict(f, fields=[dict(x, values=[x["values"][i] for i in order]) for x in f["fields"]]))
    return out


TRANSFORMS = {"organize": _organize, "convertFieldType": _convert, "sortBy": _sort}


def transform(frames, transformations):
    for t in transformations or []:
        if t.get("disabled"):
            continue
        if t["id"] not in TRANSFORMS:
            raise NotImplementedError(f"transformation {t['id']}")
        frames = TRANSFORMS[t["id"]](frames, t.get("options", {}))
    return frames


def evaluate_panel(prom, panel, variables, **kw):
    return transform(query_panel(prom, panel, variables, **kw), panel.get("transformations"))


def column(frame, name):
    return next(x for x in frame["fields"] if x["name"] == name)["values"]
