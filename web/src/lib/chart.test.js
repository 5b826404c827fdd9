import { describe, expect, it } from 'vitest'
import { timeLabel, yTicks } from './chart.js'

describe('chart axes', () => {
  it('labels times as hours and minutes, with seconds for short spans', () => {
    const t = new Date(2026, 11, 1, 9, 5, 7).getTime() / 1000
    expect(timeLabel(t, 600)).toBe('09:05')
    expect(timeLabel(t, 60)).toBe('09:05:07')
  })
  it('labels the vertical axis at zero, half and the top', () => {
    expect(yTicks(100)).toEqual([0, 50, 100])
  })
})
