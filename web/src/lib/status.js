// How a capsule state reads: a word and a shape as well as a colour, so
// it is clear without colour.
const STATES = {
  running: { symbol: '●', tone: 'ok' },
  starting: { symbol: '◐', tone: 'warn' },
  resuming: { symbol: '◐', tone: 'warn' },
  pausing: { symbol: '◑', tone: 'warn' },
  stopping: { symbol: '◑', tone: 'warn' },
  paused: { symbol: '❚❚', tone: 'idle' },
  hibernated: { symbol: '❚❚', tone: 'idle' },
  stopped: { symbol: '○', tone: 'dim' },
  missing: { symbol: '?', tone: 'bad' },
  error: { symbol: '✕', tone: 'bad' },
  pending: { symbol: '…', tone: 'warn' },
  online: { symbol: '●', tone: 'ok' },
  unreachable: { symbol: '✕', tone: 'bad' },
  success: { symbol: '✓', tone: 'ok' },
  failed: { symbol: '✕', tone: 'bad' },
  cancelled: { symbol: '○', tone: 'dim' },
}

export function statusView(state) {
  const s = STATES[state] || { symbol: '·', tone: 'dim' }
  return { label: state || 'unknown', ...s }
}

export function bytes(n) {
  if (n == null) return '-'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024
    i++
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`
}

export function ago(iso) {
  if (!iso) return '-'
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000))
  if (s < 60) return `${s}s ago`
  if (s < 3600) return `${Math.floor(s / 60)}m ago`
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`
  return `${Math.floor(s / 86400)}d ago`
}

// parseMetadataFilter reads "k=v, k2=v2" into an object; bad parts are reported.
export function parseMetadataFilter(text) {
  const out = {}
  const bad = []
  for (const part of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const i = part.indexOf('=')
    if (i <= 0) bad.push(part)
    else out[part.slice(0, i).trim()] = part.slice(i + 1).trim()
  }
  return { pairs: out, bad }
}
