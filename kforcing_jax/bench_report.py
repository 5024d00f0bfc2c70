"""bench.json as text tables (`format_tables`) and as a plot (`plot_bench`)."""

from typing import Any

from kforcing_jax import files


def compiled_peak_bytes(memory) -> int | None:
  """A cell's device footprint from its compiled memory analysis:
  arguments (weights, prompts, noise) + outputs - aliased + temporaries
  (the KV cache lives in the loop's temporaries). None if not reported."""
  c = memory.get('compiled')
  if not c or 'temp_size_in_bytes' not in c:
    return None
  return (c.get('argument_size_in_bytes', 0) + c.get('output_size_in_bytes', 0)
          - c.get('alias_size_in_bytes', 0) + c['temp_size_in_bytes'])


def mib(num_bytes) -> str:
  return '-' if num_bytes is None else f'{num_bytes / 2 ** 20:.1f}'


def format_tables(d: dict[str, Any]) -> str:
  """The measured table, the peer comparison and the accelerator table."""
  mode = d['roofline']['mode']
  other = 'max' if mode == 'sum' else 'sum'  # The column beside it.
  # Each heading ends where its column's values end.
  lines = [f'batch  k  {"model":15s} {"tok/s":>10s}  speedup  '
           f'{f"pred({mode})":>9s}  {f"pred({other})":>9s}  meas/pred  '
           f'GFLOP/s     GB/s  peak MiB']
  for r in sorted(d['results'], key=lambda r: (r['batch'], r['k'])):
    rates = ''.join(  # Files written before these fields lack them.
        f'  {r[key] / 1e9:7.1f}' if key in r else f'  {"-":>7s}'
        for key in ('achieved_flops_per_s', 'achieved_bytes_per_s'))
    lines.append(
        f'{r["batch"]:5d}  {r["k"]:d}  {r["model"]:15s} '
        f'{r["tokens_per_s"]:10.1f}  {r["speedup"]:7.2f}  '
        f'{r["predicted_speedup"]:9.2f}  '
        f'{r["predicted_speedup_modes"][other]:9.2f}  '
        f'{r["measured_over_predicted"]:9.2f}' + rates +
        f'  {mib(compiled_peak_bytes(r["memory"])):>8s}')
  roof = d['roofline']
  peak, bw = (f'{roof["peak_flops"] / 1e9:.1f} GFLOP/s',
              f'{roof["bandwidth"] / 1e9:.1f} GB/s')
  if roof['measured']:
    ceilings = f'measured ceilings {peak} and {bw}'
  else:  # Older files lack the per-ceiling flags: then both were given.
    how = ['measured' if roof.get(f'{key}_measured') else 'given'
           for key in ('peak_flops', 'bandwidth')]
    ceilings = f'ceilings {peak} ({how[0]}) and {bw} ({how[1]})'
  lines.append(f'(GFLOP/s, GB/s: the roofline cost model\'s FLOPs and bytes '
               f'of each decode over its median time; {ceilings}; peak MiB: '
               f'the compiled decode\'s arguments + outputs - aliased + '
               f'temporaries)')
  readout = d['settings'].get('readout', 'argmax')  # Older: argmax.
  if readout != 'argmax':
    how = 'sampling' if readout == 'sample' else "their softmax's median"
    lines.append(f'(bench.readout={readout}: the AR teacher samples by '
                 f'inverse CDF and the students read out by {how}; the '
                 'roofline counts no sampler work)')
  peer = d['peer']
  if peer['available']:
    pf_k = peer['results'][0]['pf_k'] if peer['results'] else '?'
    lines.append(f'\npeer: {peer["library"]}' + (
        f' ({peer["note"]})' if peer.get('note') else ''))
    lines.append(f'batch  HF tok/s    ours AR / HF  ours k={pf_k} / HF')
    for p in peer['results']:
      lines.append(f'{p["batch"]:5d}  {p["tokens_per_s"]:9.1f}  '
                   f'{p["ours_ar_over_peer"]:12.2f}  '
                   f'{p["ours_pf_over_peer"]:12.2f}')
  else:
    lines.append(f'\npeer: {peer["note"]}')
  ks = d['settings']['ks']
  lines.append('\nroofline (max) speedup from datasheet numbers, bf16 block '
               'weights and KV cache (embeddings float32, as decoding '
               'keeps them):')
  lines.append('accelerator  model   batch  AR step  ' +
               '  '.join(f'k={k:<3d}' for k in ks))
  groups: dict[tuple, dict] = {}
  for a in d['accelerators']:
    g = groups.setdefault((a['name'], a['model'], a['batch']),
                          {'bound': a['ar_step_bound']})
    g[a['k']] = a['predicted_speedup']
  for (name, model, batch), g in groups.items():
    lines.append(f'{name:11s}  {model:6s}  {batch:5d}  {g["bound"]:7s}  ' +
                 '  '.join(f'{g[k]:5.2f}' for k in ks))
  return '\n'.join(lines)


def plot_bench(d: dict[str, Any], path: str) -> None:
  """Speedup over AR vs batch (measured, ideal k, roofline) + tokens/s."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  batches = d['settings']['batch_sizes']
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  by_k: dict[int, list] = {}
  for r in d['results']:
    by_k.setdefault(r['k'], []).append(r)
  for i, (k, rows) in enumerate(sorted(by_k.items())):
    rows = sorted(rows, key=lambda r: r['batch'])
    c = colors[i % len(colors)]
    xs = [r['batch'] for r in rows]
    label = 'AR teacher' if k == 1 else f'k={k}'
    ax2.plot(xs, [r['tokens_per_s'] for r in rows], 'o-', color=c,
             label=label)
    if k == 1:
      continue
    ax.plot(xs, [r['speedup'] for r in rows], 'o-', color=c,
            label=f'k={k} measured')
    ax.plot(xs, [r['predicted_speedup'] for r in rows], ':', color=c,
            label=f'k={k} roofline')
    ax.axhline(k, color=c, linestyle='--', linewidth=1, label=f'k={k} ideal')
  ax.axhline(1.0, color='gray', linewidth=0.8)
  peer = d['peer']
  if peer['available'] and peer['results']:
    rows = sorted(peer['results'], key=lambda p: p['batch'])
    ax2.plot([p['batch'] for p in rows], [p['tokens_per_s'] for p in rows],
             's--', color='black', label='HF GPT-2 (peer)')
  for a in (ax, ax2):
    a.set_xscale('log', base=2)
    a.set_xticks(batches)
    a.set_xticklabels([str(b) for b in batches])
    a.set_xlabel('batch size')
    a.grid(True, which='both', alpha=0.3)
  ax.set_ylabel('speedup over AR (tokens/s ratio)')
  ax.set_title(f'Speedup (roofline: {d["roofline"]["mode"]})')
  ax.legend(fontsize=7, ncol=2)
  ax2.set_yscale('log')
  ax2.set_ylabel('tokens / s')
  ax2.set_title('Decoding throughput')
  ax2.legend(fontsize=8)
  m = d['machine']
  device = (m['cpu_model'] if m['backend'] == 'cpu' else m['device_kind'])
  fig.suptitle(f'{d["config_name"]}: {m["backend"]} ({device}), '
               f'{m["cpu_count"]} cores; {d["settings"]["prefix_len"]}-token '
               f'prompts + {d["settings"]["max_new_tokens"]} new tokens, '
               f'median of {d["settings"]["repeats"]}', fontsize=10)
  fig.tight_layout()
  # Atomic: a kill mid-write left a cut PNG that re-runs kept.
  files.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110))
  plt.close(fig)
