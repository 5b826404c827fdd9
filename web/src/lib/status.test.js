import { describe, expect, it } from 'vitest'
import { statusView, bytes, parseMetadataFilter } from './status.js'

describe('statusView', () => {
  it('gives every state a word and a shape, not only a colour', () => {
    for (const s of ['running', 'paused', 'starting', 'stopped', 'error', 'missing']) {
      const v = statusView(s)
      expect(v.label).toBe(s)
      expect(v.symbol.length).toBeGreaterThan(0)
    }
    expect(statusView('running').symbol).not.toBe(statusView('paused').symbol)
    expect(statusView('weird').label).toBe('weird')
  })
})

describe('bytes', () => {
  it('reads sizes in binary units', () => {
    expect(bytes(512)).toBe('512 B')
    expect(bytes(1536)).toBe('1.5 KiB')
    expect(bytes(256 * 1024 * 1024)).toBe('256.0 MiB')
    expect(bytes(null)).toBe('-')
  })
})

describe('parseMetadataFilter', () => {
  it('reads key=value pairs and reports the rest', () => {
    expect(parseMetadataFilter('team=a, env = prod')).toEqual({ pairs: { team: 'a', env: 'prod' }, bad: [] })
    expect(parseMetadataFilter('oops, =x').bad).toEqual(['oops', '=x'])
    expect(parseMetadataFilter('').pairs).toEqual({})
  })
})
