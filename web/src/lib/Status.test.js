import { describe, expect, it } from 'vitest'
import { render, screen } from '@testing-library/svelte'
import Status from './Status.svelte'

describe('Status', () => {
  it('shows the state as text next to its symbol', () => {
    render(Status, { state: 'paused' })
    const el = screen.getByTitle('paused')
    expect(el.textContent).toContain('paused')
    expect(el.className).toContain('idle')
  })
})
