"""The HTML of ``clipcap report``: one self-contained page (inline CSS, images as data URIs, no scripts).

Rendered with Jinja2 with autoescaping on: captions, references, keys and the model card are untrusted text.
Element ids the browser test (and users' scripts) rely on: ``metrics`` (metric table), ``gallery`` (one
``figure.card`` per image), ``chart-training``, ``chart-clip``, ``interpretation``, ``model-card``.
"""

from __future__ import annotations

from typing import Any

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>clipcap report: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure.card { width: 260px; margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure.card img { display: block; margin: 0 auto 6px; max-width: 100%; }
.key { font-size: 0.75em; color: #777; word-break: break-all; }
.cap { font-weight: 600; overflow-wrap: anywhere; } .alt { color: #555; font-size: 0.85em; } .ref { color: #2a6a2a; font-size: 0.85em; }
.scores { font-size: 0.8em; color: #444; } .missing { color: #a33; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 10px; white-space: pre-wrap; }
</style></head><body>
<h1>clipcap report: {{ title }}</h1>
<p>Caption table <code>{{ captions }}</code>{% if model %}, model <code>{{ model }}</code>{% endif %}.
Sample: {{ items|length }} images from {{ parts_read }} of {{ parts_total }} parts ({{ rows_read }} rows read;
the report never reads a whole table).</p>

<h2>Metrics</h2>
{% if metrics %}
<table id="metrics"><tr><th>metric</th><th>value (x100)</th></tr>
{% for label, value in metrics %}<tr><td>{{ label }}</td><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
<p class="scores">{{ eval_note }}</p>
{% else %}<p id="metrics-missing">No evaluation given (<code>--evaluation DIR</code> from <code>clipcap evaluate</code>).</p>{% endif %}

<h2>Charts</h2>
{% if training_chart %}<img id="chart-training" alt="training curves" src="{{ training_chart }}">{% else %}
<p>No training run given (<code>--run DIR</code> with a history.json).</p>{% endif %}
{% if clip_chart %}<img id="chart-clip" alt="CLIPScore histogram" src="{{ clip_chart }}">{% endif %}

<h2>Gallery</h2>
<div id="gallery">
{% for it in items %}<figure class="card">
{% if it.thumbnail %}<img class="thumb" alt="{{ it.key }}" src="{{ it.thumbnail }}">{% else %}
<div class="missing">{{ it.image_error or "no image" }}</div>{% endif %}
<figcaption><div class="key">{{ it.key }}</div>
{% for c in it.captions %}<div class="{{ 'cap' if loop.first else 'alt' }}">{{ c.caption }}</div>
<div class="scores">rank {{ c.get("rank", 0) }} · log-prob {{ "%.2f"|format(c.score) if c.get("score") is not none else "-" }}
{% if c.get("clip_score") is not none %} · CLIPScore {{ "%.3f"|format(c.clip_score) }}{% endif %}</div>{% endfor %}
{% for r in it.evaluation.get("references") or [] %}<div class="ref">ref: {{ r }}</div>{% endfor %}
{% if it.evaluation %}<div class="scores">{% for k in score_keys if it.evaluation.get(k) is not none %}{{ k }} {{ "%.3f"|format(it.evaluation[k]) }} {% endfor %}</div>{% endif %}
</figcaption></figure>
{% endfor %}
</div>

<h2>Prefix interpretation</h2>
{% if interpretation %}<table id="interpretation"><tr><th>image</th><th>caption</th><th>nearest token per prefix vector</th></tr>
{% for row in interpretation %}<tr><td class="key">{{ row.key }}</td><td>{{ row.caption }}</td><td><code>{{ row.tokens|join(" | ") }}</code></td></tr>{% endfor %}
</table><p class="scores">Nearest LM input embedding (cosine) to each of the model's prefix vectors (ClipCap paper, Fig. 6).</p>
{% else %}<p>{{ interpretation_note }}</p>{% endif %}

<h2>Model card</h2>
{% if model_card %}<pre id="model-card">{{ model_card }}</pre>{% else %}<p>{{ model_card_note }}</p>{% endif %}
</body></html>
"""


def render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(**context)
