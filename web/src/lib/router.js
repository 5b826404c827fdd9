// A hash router: #/capsules/sb-x is page "capsules" with param "sb-x".
import { writable } from 'svelte/store'

function parse() {
  // Links in mail are paths (/activate?token=...); everything else is a hash.
  if (!location.hash && location.pathname !== '/') {
    return { page: location.pathname.slice(1), param: '', query: new URLSearchParams(location.search) }
  }
  const parts = location.hash.replace(/^#\/?/, '').split('?')[0].split('/').filter(Boolean)
  const query = new URLSearchParams(location.hash.split('?')[1] || '')
  return { page: parts[0] || '', param: parts[1] || '', query }
}

export const route = writable(parse())
window.addEventListener('hashchange', () => route.set(parse()))

export function go(path) {
  location.hash = '#/' + path.replace(/^\//, '')
}
