// Microphone samples off the audio thread: 100 ms blocks of 16-bit PCM (the context runs at the
// session's rate, 16 kHz, so the browser does the resampling).
"use strict";

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Int16Array(sampleRate / 10);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.block[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.filled === this.block.length) {
          this.port.postMessage(this.block.slice());
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
