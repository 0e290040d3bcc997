/*
 * tunnelscope/nio/fastpath/bpf.c - classic BPF, for capture filters and stage filters.
 *
 * tunnelscope/datapath/bpf.py is the reference (it compiles tcpdump expressions, and runs the
 * same programs in Python). A program comes from Python as (code, jt, jf, k) tuples and is
 * checked once (bpf_check): it then runs forward only, every load bounds-checked, so bpf_run
 * needs no other guard. A load past the frame's end rejects the frame.
 */
#include "fastpath.h"

#include <stdlib.h>

#define BPF_MAX_INSNS 4096            /* a classic BPF program's longest length */

enum {
    BPF_LD = 0x00, BPF_LDX = 0x01, BPF_ST = 0x02, BPF_STX = 0x03,
    BPF_ALU = 0x04, BPF_JMP = 0x05, BPF_RET = 0x06, BPF_MISC = 0x07,
    BPF_W = 0x00, BPF_H = 0x08, BPF_B = 0x10,
    BPF_IMM = 0x00, BPF_ABS = 0x20, BPF_IND = 0x40, BPF_MEM = 0x60, BPF_LEN = 0x80, BPF_MSH = 0xa0,
    BPF_ADD = 0x00, BPF_SUB = 0x10, BPF_MUL = 0x20, BPF_DIV = 0x30, BPF_OR = 0x40,
    BPF_AND = 0x50, BPF_LSH = 0x60, BPF_RSH = 0x70, BPF_NEG = 0x80, BPF_MOD = 0x90,
    BPF_XOR = 0xa0,
    BPF_JA = 0x00, BPF_JEQ = 0x10, BPF_JGT = 0x20, BPF_JGE = 0x30, BPF_JSET = 0x40,
    BPF_K = 0x00, BPF_X = 0x08, BPF_A = 0x10,
    BPF_TAX = 0x00, BPF_TXA = 0x80,
    BPF_MEMWORDS = 16,
};

/* NULL when the program may run, else why not. */
static const char *bpf_check(const bpf_insn_t *prog, size_t n)
{
    if (n == 0 || n > BPF_MAX_INSNS)
        return "empty or too long";
    for (size_t pc = 0; pc < n; pc++) {
        const bpf_insn_t *i = &prog[pc];
        unsigned cls = i->code & 0x07, mode = i->code & 0xe0, op = i->code & 0xf0;
        size_t left = n - pc - 1;
        switch (cls) {
        case BPF_LD:
        case BPF_LDX:
            if ((mode == BPF_MEM && i->k >= BPF_MEMWORDS) ||
                (cls == BPF_LDX && mode != BPF_IMM && mode != BPF_MEM && mode != BPF_LEN &&
                 !(mode == BPF_MSH && (i->code & 0x18) == BPF_B)) ||
                (cls == BPF_LD && mode == BPF_MSH))
                return "bad load";
            break;
        case BPF_ST:
        case BPF_STX:
            if (i->k >= BPF_MEMWORDS)
                return "bad store";
            break;
        case BPF_ALU:
            if (op > BPF_XOR)
                return "bad ALU op";
            if ((op == BPF_DIV || op == BPF_MOD) && (i->code & BPF_X) == 0 && i->k == 0)
                return "division by zero";
            break;
        case BPF_JMP:
            if (op == BPF_JA ? i->k >= left : (op > BPF_JSET || i->jt >= left || i->jf >= left))
                return "jump out of the program";
            break;
        case BPF_RET:
            break;
        case BPF_MISC:
            if (i->code != (BPF_MISC | BPF_TAX) && i->code != (BPF_MISC | BPF_TXA))
                return "bad misc op";
            break;
        }
    }
    return (prog[n - 1].code & 0x07) == BPF_RET ? NULL : "does not end with a return";
}

static inline bool bpf_load(const uint8_t *p, uint32_t len, uint32_t at, unsigned size,
                            uint32_t *out)
{
    if (at >= len || len - at < size)
        return false;
    *out = size == 4 ? (uint32_t)p[at] << 24 | (uint32_t)p[at + 1] << 16 |
                           (uint32_t)p[at + 2] << 8 | p[at + 3]
           : size == 2 ? (uint32_t)p[at] << 8 | p[at + 1]
                       : p[at];
    return true;
}

/* Run a checked program on one frame: the number of bytes to keep, 0 = rejected. */
uint32_t bpf_run(const bpf_insn_t *prog, const uint8_t *p, uint32_t len)
{
    uint32_t A = 0, X = 0, mem[BPF_MEMWORDS] = {0};
    for (size_t pc = 0;; pc++) {
        const bpf_insn_t *i = &prog[pc];
        unsigned cls = i->code & 0x07, mode = i->code & 0xe0, op = i->code & 0xf0;
        unsigned size = (i->code & 0x18) == BPF_B ? 1 : (i->code & 0x18) == BPF_H ? 2 : 4;
        uint32_t v = (i->code & BPF_X) ? X : i->k;
        switch (cls) {
        case BPF_LD:
        case BPF_LDX: {
            uint32_t value;
            if (mode == BPF_IMM)
                value = i->k;
            else if (mode == BPF_LEN)
                value = len;
            else if (mode == BPF_MEM)
                value = mem[i->k];
            else if (cls == BPF_LDX) { /* MSH: 4 * the low nibble of a byte (an IP header) */
                if (!bpf_load(p, len, i->k, 1, &value))
                    return 0;
                value = (value & 0x0f) * 4;
            } else if ((mode == BPF_IND && X + i->k < X) ||
                       !bpf_load(p, len, mode == BPF_IND ? X + i->k : i->k, size, &value))
                return 0;
            if (cls == BPF_LD)
                A = value;
            else
                X = value;
            break;
        }
        case BPF_ST:
            mem[i->k] = A;
            break;
        case BPF_STX:
            mem[i->k] = X;
            break;
        case BPF_ALU:
            switch (op) {
            case BPF_ADD: A += v; break;
            case BPF_SUB: A -= v; break;
            case BPF_MUL: A *= v; break;
            case BPF_DIV: if (v == 0) return 0; A /= v; break;
            case BPF_MOD: if (v == 0) return 0; A %= v; break;
            case BPF_OR: A |= v; break;
            case BPF_AND: A &= v; break;
            case BPF_LSH: A = v < 32 ? A << v : 0; break;
            case BPF_RSH: A = v < 32 ? A >> v : 0; break;
            case BPF_NEG: A = 0u - A; break;
            default: A ^= v; break;
            }
            break;
        case BPF_JMP:
            if (op == BPF_JA) {
                pc += i->k;
                break;
            }
            bool taken = op == BPF_JEQ ? A == v : op == BPF_JGT ? A > v
                       : op == BPF_JGE ? A >= v : (A & v) != 0;
            pc += taken ? i->jt : i->jf;
            break;
        case BPF_RET:
            return (i->code & 0x18) == BPF_A ? A : (i->code & 0x18) == BPF_X ? X : i->k;
        default: /* BPF_MISC */
            if (i->code == (BPF_MISC | BPF_TAX))
                X = A;
            else
                A = X;
            break;
        }
    }
}

/* A filter from Python: a list of (code, jt, jf, k) tuples, checked. NULL with an exception. */
bpf_insn_t *parse_filter(PyObject *obj, size_t *n)
{
    PyObject *seq = PySequence_Fast(obj, "filter must be a list of (code, jt, jf, k) tuples");
    if (!seq)
        return NULL;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    bpf_insn_t *prog = len > 0 && len <= BPF_MAX_INSNS ? calloc((size_t)len, sizeof *prog) : NULL;
    if (!prog) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "filter: empty or too long");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned int code, jt, jf, k;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyArg_ParseTuple(item, "IIII;filter instructions are (code, jt, jf, k)", &code,
                              &jt, &jf, &k) ||
            code > UINT16_MAX || jt > UINT8_MAX || jf > UINT8_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "filter instruction out of range");
            free(prog);
            Py_DECREF(seq);
            return NULL;
        }
        prog[i] = (bpf_insn_t){(uint16_t)code, (uint8_t)jt, (uint8_t)jf, k};
    }
    Py_DECREF(seq);
    const char *why = bpf_check(prog, (size_t)len);
    if (why) {
        PyErr_Format(PyExc_ValueError, "filter rejected: %s", why);
        free(prog);
        return NULL;
    }
    *n = (size_t)len;
    return prog;
}
