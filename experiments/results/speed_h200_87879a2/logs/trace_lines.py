import sys, glob, os, collections
import jax
fs = sorted(glob.glob('/root/fibax/trace/options_0/**/*.xplane.pb', recursive=True), key=os.path.getmtime)
print(fs)
for f in fs:
  planes = jax.profiler.ProfileData.from_file(f).planes
  for p in planes:
    if not p.name.startswith('/device:'): continue
    print('PLANE', p.name)
    for line in p.lines:
      ev = sorted((e.start_ns, e.end_ns, e.name) for e in line.events)
      if not ev: print('  ', line.name, 0); continue
      tot = sum(b-a for a,b,_ in ev); span = ev[-1][1]-ev[0][0]
      idle = 0; end = None; g = collections.Counter()
      last = None
      for a,b,n in ev:
        if end is not None and a > end: idle += a-end; g[(last,n)] += a-end
        if end is None or b > end: end, last = b, n
      print('  ', repr(line.name), len(ev), 'sum_ms', round(tot/1e6,2), 'span_ms', round(span/1e6,2), 'idle_ms', round(idle/1e6,2))
      print('     longest', sorted(ev, key=lambda e: e[0]-e[1])[:3])
      for k,v in g.most_common(14): print('     gap', round(v/1e6,3), [x[:60] for x in k])
