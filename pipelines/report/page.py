"""The HTML of ``clipcap report``: one self-contained page (inline CSS, images as data URIs, no scripts).
Autoescaped: captions, references, keys and the model card are untrusted text. The browser tests read the ids.
"""

from __future__ import annotations

from typing import Any

import jinja2

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>clipcap report: {{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#failures { border: 2px solid #b00020; background: #fff4f4; border-radius: 6px; padding: 4px 14px 10px; }
#failures.ok { border-color: #2a6a2a; background: #f3fbf3; }
#failures h2 { border: none; margin-top: 0.6em; color: #b00020; } #failures.ok h2 { color: #2a6a2a; }
#failures h3 { font-size: 1em; margin: 1em 0 0.3em; }
tr.failure td.cap { color: #b00020; }
#gallery { display: flex; flex-wrap: wrap; gap: 12px; }
#order-worst:checked ~ #gallery figure.card { order: var(--worst-rank); }
#order-key:checked ~ #gallery figure.card { order: var(--key-rank); }
figure.card { width: 260px; margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure.card.bad { border: 3px solid #b00020; background: #fff4f4; }
figure.card img { display: block; margin: 0 auto 6px; max-width: 100%; }
.flag { color: #b00020; font-weight: 700; font-size: 0.85em; }
.key { font-size: 0.75em; color: #777; word-break: break-all; }
.cap { font-weight: 600; overflow-wrap: anywhere; } .alt { color: #555; font-size: 0.85em; }
.ref { font-size: 0.85em; } .ref-match { color: #2a6a2a; } .ref-miss { color: #666; }
.scores { font-size: 0.8em; color: #444; } .missing { color: #a33; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 10px; white-space: pre-wrap; }
</style></head><body>
<h1>clipcap report: {{ title }}</h1>
<p>Caption table <code>{{ captions }}</code>{% if model %}, model <code>{{ model }}</code>{% endif %}.
Sample: {{ items|length }} images from {{ parts_read }} of {{ parts_total }} parts ({{ rows_read }} rows read;
the report never reads a whole table).</p>

{% set f = failures %}
<section id="failures" class="{{ 'bad' if f.any else 'ok' }}">
<h2>{% if f.any %}&#9888; What went wrong{% else %}&#10003; Nothing flagged{% endif %}</h2>
<p id="failures-summary">{% if f.source == "evaluation" %}Every evaluated image ({{ f.checked }}){% else %}The {{ f.checked }} sampled images (no <code>--evaluation</code>: no references){% endif %}:
<strong>{{ f.mismatch_count }} of {{ f.with_references }}</strong> captions match none of their references;
<strong>{{ f.degenerate_count }}</strong> empty or looping.</p>
{% if f.mismatches %}<h3>Captions that match no reference{% if f.mismatch_count > f.mismatches|length %} (worst {{ f.mismatches|length }} of {{ f.mismatch_count }}){% endif %}</h3>
<table id="failures-mismatch"><tr><th>image</th><th>caption</th><th>references</th><th>CIDEr (0-10)</th><th>CLIPScore (0-2.5)</th></tr>
{% for r in f.mismatches %}<tr class="failure" data-key="{{ r.image_id }}"><td class="key">{{ r.image_id }}</td><td class="cap">{{ r.caption or "(empty)" }}</td>
<td>{{ (r.references or [])|join(" | ") }}</td><td class="num">{{ "%.3f"|format(r.cider) if r.get("cider") is not none else "-" }}</td>
<td class="num">{{ "%.3f"|format(r.clip_score) if r.get("clip_score") is not none else "-" }}</td></tr>{% endfor %}
</table>{% endif %}
{% if f.degenerate %}<h3>Empty or looping captions{% if f.degenerate_count > f.degenerate|length %} (first {{ f.degenerate|length }} of {{ f.degenerate_count }}){% endif %}</h3>
<table id="failures-degenerate"><tr><th>image</th><th>caption</th><th>why</th></tr>
{% for r in f.degenerate %}<tr class="failure" data-key="{{ r.image_id }}"><td class="key">{{ r.image_id }}</td><td class="cap">{{ r.caption or "(empty)" }}</td><td>{{ r.why }}</td></tr>{% endfor %}
</table>{% endif %}
{% if f.lowest_clip %}<h3>Lowest CLIPScore (0-2.5: 2.5 x max(cosine of image and caption, 0))</h3>
<table id="failures-low-clip"><tr><th>image</th><th>caption</th><th>CLIPScore</th></tr>
{% for r in f.lowest_clip %}<tr data-key="{{ r.image_id }}"><td class="key">{{ r.image_id }}</td><td>{{ r.caption }}</td><td class="num">{{ "%.3f"|format(r.clip_score) }}</td></tr>{% endfor %}
</table>{% endif %}
</section>

<h2>Metrics</h2>
{% if metrics %}
<table id="metrics"><tr><th>metric</th><th>value (x100)</th><th>range (x100)</th><th>what it measures</th></tr>
{% for label, value, range, meaning in metrics %}<tr><td>{{ label }}</td><td class="num">{{ value }}</td><td class="num">{{ range }}</td><td class="scores">{{ meaning }}</td></tr>{% endfor %}
</table>
<p class="scores">{{ eval_note }} Every score is x100 as COCO tables print it: a BLEU-4 of 35.00 is 0.35 of 1, a
CLIPScore of 241.60 is 2.416 of its maximum 2.5.</p>
{% else %}<p id="metrics-missing">No evaluation given (<code>--evaluation DIR</code> from <code>clipcap evaluate</code>).</p>{% endif %}

<h2>Charts</h2>
{% if training_chart %}<img id="chart-training" alt="training curves" src="{{ training_chart }}">{% else %}
<p>No training run given (<code>--run DIR</code> with a history.json).</p>{% endif %}
{% if clip_chart %}<img id="chart-clip" alt="CLIPScore histogram" src="{{ clip_chart }}">{% endif %}

<h2>Gallery</h2>
<p class="scores">Flagged cards first, then lowest CIDEr and CLIPScore (or by key). Scores per image:
log-prob {{ log_prob_scale }}; {% for k in score_keys %}{{ k }} {{ scale(k) }}{{ "; " if not loop.last else "." }}{% endfor %}</p>
Order: <input type="radio" name="order" id="order-worst"{% if order == "worst" %} checked{% endif %}><label for="order-worst">worst first</label>
<input type="radio" name="order" id="order-key"{% if order == "key" %} checked{% endif %}><label for="order-key">by key</label>
<div id="gallery">
{% for c in cards %}{% set it = c.it %}<figure class="card{{ ' bad' if c.flags else '' }}" data-key="{{ it.key }}" style="--worst-rank: {{ c.worst_rank }}; --key-rank: {{ c.key_rank }}">
{% if it.thumbnail %}<img class="thumb" alt="{{ it.key }}" src="{{ it.thumbnail }}">{% else %}
<div class="missing">{{ it.image_error or "no image" }}</div>{% endif %}
<figcaption>{% for flag in c.flags %}<div class="flag">&#10007; {{ flag }}</div>{% endfor %}<div class="key">{{ it.key }}</div>
{% for cap in it.captions %}<div class="{{ 'cap' if loop.first else 'alt' }}">{{ cap.caption }}</div>
<div class="scores">rank {{ cap.get("rank", 0) }} · log-prob {{ "%.2f"|format(cap.score) if cap.get("score") is not none else "-" }}
{% if cap.get("clip_score") is not none %} · CLIPScore {{ "%.3f"|format(cap.clip_score) }} of 2.5{% endif %}</div>{% endfor %}
{% for ref, matched in c.refs %}<div class="ref {{ 'ref-match' if matched else 'ref-miss' }}">{{ "= ref" if matched else "ref" }}: {{ ref }}</div>{% endfor %}
{% if it.evaluation %}<div class="scores">{% for k in score_keys if it.evaluation.get(k) is not none %}{{ k }} {{ "%.3f"|format(it.evaluation[k]) }} ({{ scale(k) }}) {% endfor %}</div>{% endif %}
</figcaption></figure>
{% endfor %}
</div>

<h2>Prefix interpretation</h2>
{% if interpretation %}<table id="interpretation"><tr><th>image</th><th>caption</th><th>nearest token per prefix vector</th></tr>
{% for row in interpretation %}<tr><td class="key">{{ row.key }}</td><td>{{ row.caption }}</td><td><code>{{ row.tokens|join(" | ") }}</code></td></tr>{% endfor %}
</table><p class="scores">Nearest LM input embedding (cosine) to each of the model's prefix vectors (ClipCap paper, Fig. 6).</p>
{% else %}<p>{{ interpretation_note }}</p>{% endif %}

{% if studies %}<h2>Studies</h2>
{% for st in studies %}<section class="study" id="study-{{ st.name }}"><h3>{{ st.name }}</h3>
{% if st.plot %}<img alt="{{ st.name }} plot" src="{{ st.plot }}">{% endif %}<pre>{{ st.table }}</pre></section>
{% endfor %}{% endif %}

<h2>Model card</h2>
{% if card %}<table id="model-card">{% for title, rows in card %}<tr><th colspan="2">{{ title }}</th></tr>
{% for name, value in rows %}<tr><td>{{ name }}</td><td>{{ value }}</td></tr>{% endfor %}{% endfor %}</table>{% endif %}
{% if model_card %}<details{% if not card %} open{% endif %}><summary>README.md of the model</summary><pre id="model-card-readme">{{ model_card }}</pre></details>
{% elif not card %}<p>{{ model_card_note }}</p>{% endif %}
</body></html>
"""


def render(context: dict[str, Any]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(**context)
