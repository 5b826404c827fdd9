// The dashboard's client of the Wrenn API. The user's JWT lives in
// localStorage; every call sends it as a bearer token.

const TOKEN = 'wrenn.token'

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

export function token() {
  return localStorage.getItem(TOKEN) || ''
}

export function setSession(t) {
  if (t) localStorage.setItem(TOKEN, t)
  else localStorage.removeItem(TOKEN)
  window.dispatchEvent(new Event('wrenn-session'))
}

// claims reads the JWT's payload (user, team, admin flag, expiry).
export function claims() {
  const t = token()
  if (!t) return null
  try {
    const c = JSON.parse(atob(t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')))
    if (c.exp && c.exp * 1000 < Date.now()) return null
    return c
  } catch {
    return null
  }
}

// errorFrom turns an API answer into an ApiError.
export async function errorFrom(resp) {
  let code = 'http_' + resp.status
  let message = resp.statusText || 'request failed'
  try {
    const body = await resp.json()
    if (body && body.error) {
      code = body.error.code
      message = body.error.message
    }
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(resp.status, code, message)
}

export async function request(method, path, body, { raw = false } = {}) {
  const headers = {}
  if (token()) headers.Authorization = 'Bearer ' + token()
  let payload
  if (body instanceof FormData) payload = body
  else if (body !== undefined) {
    headers['Content-Type'] = 'application/json'
    payload = JSON.stringify(body)
  }
  const resp = await fetch(path, { method, headers, body: payload })
  if (resp.status === 401 && token()) setSession('')
  if (!resp.ok) throw await errorFrom(resp)
  if (raw) return resp
  if (resp.status === 204) return null
  return resp.json()
}

export const get = (p) => request('GET', p)
export const post = (p, b) => request('POST', p, b)
export const del = (p) => request('DELETE', p)

// ticket gets a single-use credential for one WebSocket or EventSource
// (path: the stream it opens; default the team's event stream), which
// cannot carry an Authorization header.
export async function ticket(path) {
  const t = await post('/v1/events/token', path ? { path } : undefined)
  return t.ticket
}

export function wsURL(path, t) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:'
  return `${proto}//${location.host}${path}?ticket=${encodeURIComponent(t)}`
}

// watchEvents calls onEvent for each of the team's lifecycle events and
// reconnects after drops; it returns a stop function.
export function watchEvents(onEvent) {
  let source = null
  let stopped = false
  let retry = null
  const open = async () => {
    try {
      const t = await ticket()
      if (stopped) return
      source = new EventSource(`/v1/events/stream?ticket=${encodeURIComponent(t)}`)
      source.onmessage = (m) => onEvent(JSON.parse(m.data))
      for (const name of ['capsule.created', 'capsule.running', 'capsule.paused', 'capsule.destroyed', 'capsule.error',
        'template.snapshot.created', 'template.snapshot.deleted', 'host.up', 'host.down']) {
        source.addEventListener(name, (m) => onEvent(JSON.parse(m.data)))
      }
      source.onerror = () => {
        source.close()
        if (!stopped) retry = setTimeout(open, 3000)
      }
    } catch {
      if (!stopped) retry = setTimeout(open, 5000)
    }
  }
  open()
  return () => {
    stopped = true
    clearTimeout(retry)
    if (source) source.close()
  }
}
