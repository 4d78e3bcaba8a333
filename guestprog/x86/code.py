"""The x86 witness guest's machine code, assembled from witness.S by
tools/gen_x86_witness.py (do not edit: rerun it). `LISTING` is its disassembly at
the guest-physical address it runs from."""

CODE = bytes.fromhex(
    "49bb215353454e5449574d31fb0f3148"
    "c1e2204809d04989c449b9d308a38588"
    "6a3f244d31f9660fefc049c706000000"
    "008b2c250c000000e88d000000ffcd75"
    "f789d866ba1005efe84a0000004101d8"
    "66ba1105ed89c1e83b0000004439c10f"
    "8510020000e80a01000048ffc3660fd4"
    "056b0200008b04251000000085c074b1"
    "488b0c251800000049890e66ba1205ef"
    "e802000000eb9a51520f3148c1e22048"
    "09d04889c14c29e10f828f0100004989"
    "c4492b0e730231c949c706000000004c"
    "39e976034989cd5a59c3e8c8ffffff48"
    "b8215353454e5449574c31f84c39d80f"
    "85660100004c89f848c1e00d48050000"
    "01004c39f00f855001000066480f7ec0"
    "4839d80f85500100004d85d2742b498d"
    "42ff89c181e1ff000000c1e104493984"
    "0e001000000f853c0100004d398c0e08"
    "1000000f852e0100004c89c84c31d048"
    "b9157c4a7fb979379e480fafc148c1c0"
    "1d4989c14489d181e1ff000000c1e104"
    "4d89940e001000004d898c0e08100000"
    "49ffc2c3498dbe00010000488d350801"
    "0000b905000000f3a44c89f8e8870000"
    "00488d35f7000000b905000000f3a448"
    "89d8e871000000488d35e6000000b908"
    "000000f3a44c89e8b9e803000048f7e1"
    "8b0c251400000048f7f14531ede84600"
    "0000c6070a48ffc7498db60001000048"
    "89f94829f166baf8034889cf4883ff04"
    "720c6fe89ffeffff4883ef04ebee40f6"
    "c7027407666fe88cfeffff40f6c70174"
    "066ee880feffffc3498d7640b90a0000"
    "0031d248f7f180c23048ffce88164885"
    "c075ee498d4e404829f1f3a4c3488d35"
    "58000000b90a000000eb36488d355400"
    "0000b90b000000eb28488d3551000000"
    "b90a000000eb1a488d354d000000b90e"
    "000000eb0c488d354d000000b90d0000"
    "0066baf803f36ef4ebfd766370753d20"
    "7365713d206761705f75733d50414e49"
    "43207473630a50414e49432072656773"
    "0a50414e494320786d6d0a50414e4943"
    "206a6f75726e616c0a50414e49432064"
    "65766963650a662e0f1f840000000000"
    "01000000000000000000000000000000"
)

LISTING = """\
0000000000001000 <entry>:
    1000:	49 bb 21 53 53 45 4e 	movabs r11,0x5749544e45535321
    1007:	54 49 57
    100a:	4d 31 fb             	xor    r11,r15
    100d:	0f 31                	rdtsc
    100f:	48 c1 e2 20          	shl    rdx,0x20
    1013:	48 09 d0             	or     rax,rdx
    1016:	49 89 c4             	mov    r12,rax
    1019:	49 b9 d3 08 a3 85 88 	movabs r9,0x243f6a8885a308d3
    1020:	6a 3f 24
    1023:	4d 31 f9             	xor    r9,r15
    1026:	66 0f ef c0          	pxor   xmm0,xmm0
    102a:	49 c7 06 00 00 00 00 	mov    QWORD PTR [r14],0x0

0000000000001031 <line>:
    1031:	8b 2c 25 0c 00 00 00 	mov    ebp,DWORD PTR ds:0xc

0000000000001038 <step>:
    1038:	e8 8d 00 00 00       	call   10ca <check_step>
    103d:	ff cd                	dec    ebp
    103f:	75 f7                	jne    1038 <step>
    1041:	89 d8                	mov    eax,ebx
    1043:	66 ba 10 05          	mov    dx,0x510
    1047:	ef                   	out    dx,eax
    1048:	e8 4a 00 00 00       	call   1097 <tick>
    104d:	41 01 d8             	add    r8d,ebx
    1050:	66 ba 11 05          	mov    dx,0x511
    1054:	ed                   	in     eax,dx
    1055:	89 c1                	mov    ecx,eax
    1057:	e8 3b 00 00 00       	call   1097 <tick>
    105c:	44 39 c1             	cmp    ecx,r8d
    105f:	0f 85 10 02 00 00    	jne    1275 <panic_device>
    1065:	e8 0a 01 00 00       	call   1174 <write_line>
    106a:	48 ff c3             	inc    rbx
    106d:	66 0f d4 05 6b 02 00 	paddq  xmm0,XMMWORD PTR [rip+0x26b]        # 12e0 <one>
    1074:	00
    1075:	8b 04 25 10 00 00 00 	mov    eax,DWORD PTR ds:0x10
    107c:	85 c0                	test   eax,eax
    107e:	74 b1                	je     1031 <line>
    1080:	48 8b 0c 25 18 00 00 	mov    rcx,QWORD PTR ds:0x18
    1087:	00
    1088:	49 89 0e             	mov    QWORD PTR [r14],rcx
    108b:	66 ba 12 05          	mov    dx,0x512
    108f:	ef                   	out    dx,eax
    1090:	e8 02 00 00 00       	call   1097 <tick>
    1095:	eb 9a                	jmp    1031 <line>

0000000000001097 <tick>:
    1097:	51                   	push   rcx
    1098:	52                   	push   rdx
    1099:	0f 31                	rdtsc
    109b:	48 c1 e2 20          	shl    rdx,0x20
    109f:	48 09 d0             	or     rax,rdx
    10a2:	48 89 c1             	mov    rcx,rax
    10a5:	4c 29 e1             	sub    rcx,r12
    10a8:	0f 82 8f 01 00 00    	jb     123d <panic_tsc>
    10ae:	49 89 c4             	mov    r12,rax
    10b1:	49 2b 0e             	sub    rcx,QWORD PTR [r14]
    10b4:	73 02                	jae    10b8 <tick+0x21>
    10b6:	31 c9                	xor    ecx,ecx
    10b8:	49 c7 06 00 00 00 00 	mov    QWORD PTR [r14],0x0
    10bf:	4c 39 e9             	cmp    rcx,r13
    10c2:	76 03                	jbe    10c7 <tick+0x30>
    10c4:	49 89 cd             	mov    r13,rcx
    10c7:	5a                   	pop    rdx
    10c8:	59                   	pop    rcx
    10c9:	c3                   	ret

00000000000010ca <check_step>:
    10ca:	e8 c8 ff ff ff       	call   1097 <tick>
    10cf:	48 b8 21 53 53 45 4e 	movabs rax,0x5749544e45535321
    10d6:	54 49 57
    10d9:	4c 31 f8             	xor    rax,r15
    10dc:	4c 39 d8             	cmp    rax,r11
    10df:	0f 85 66 01 00 00    	jne    124b <panic_regs>
    10e5:	4c 89 f8             	mov    rax,r15
    10e8:	48 c1 e0 0d          	shl    rax,0xd
    10ec:	48 05 00 00 01 00    	add    rax,0x10000
    10f2:	4c 39 f0             	cmp    rax,r14
    10f5:	0f 85 50 01 00 00    	jne    124b <panic_regs>
    10fb:	66 48 0f 7e c0       	movq   rax,xmm0
    1100:	48 39 d8             	cmp    rax,rbx
    1103:	0f 85 50 01 00 00    	jne    1259 <panic_xmm>
    1109:	4d 85 d2             	test   r10,r10
    110c:	74 2b                	je     1139 <check_step+0x6f>
    110e:	49 8d 42 ff          	lea    rax,[r10-0x1]
    1112:	89 c1                	mov    ecx,eax
    1114:	81 e1 ff 00 00 00    	and    ecx,0xff
    111a:	c1 e1 04             	shl    ecx,0x4
    111d:	49 39 84 0e 00 10 00 	cmp    QWORD PTR [r14+rcx*1+0x1000],rax
    1124:	00
    1125:	0f 85 3c 01 00 00    	jne    1267 <panic_journal>
    112b:	4d 39 8c 0e 08 10 00 	cmp    QWORD PTR [r14+rcx*1+0x1008],r9
    1132:	00
    1133:	0f 85 2e 01 00 00    	jne    1267 <panic_journal>
    1139:	4c 89 c8             	mov    rax,r9
    113c:	4c 31 d0             	xor    rax,r10
    113f:	48 b9 15 7c 4a 7f b9 	movabs rcx,0x9e3779b97f4a7c15
    1146:	79 37 9e
    1149:	48 0f af c1          	imul   rax,rcx
    114d:	48 c1 c0 1d          	rol    rax,0x1d
    1151:	49 89 c1             	mov    r9,rax
    1154:	44 89 d1             	mov    ecx,r10d
    1157:	81 e1 ff 00 00 00    	and    ecx,0xff
    115d:	c1 e1 04             	shl    ecx,0x4
    1160:	4d 89 94 0e 00 10 00 	mov    QWORD PTR [r14+rcx*1+0x1000],r10
    1167:	00
    1168:	4d 89 8c 0e 08 10 00 	mov    QWORD PTR [r14+rcx*1+0x1008],r9
    116f:	00
    1170:	49 ff c2             	inc    r10
    1173:	c3                   	ret

0000000000001174 <write_line>:
    1174:	49 8d be 00 01 00 00 	lea    rdi,[r14+0x100]
    117b:	48 8d 35 08 01 00 00 	lea    rsi,[rip+0x108]        # 128a <s_vcpu>
    1182:	b9 05 00 00 00       	mov    ecx,0x5
    1187:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    1189:	4c 89 f8             	mov    rax,r15
    118c:	e8 87 00 00 00       	call   1218 <put_dec>
    1191:	48 8d 35 f7 00 00 00 	lea    rsi,[rip+0xf7]        # 128f <s_seq>
    1198:	b9 05 00 00 00       	mov    ecx,0x5
    119d:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    119f:	48 89 d8             	mov    rax,rbx
    11a2:	e8 71 00 00 00       	call   1218 <put_dec>
    11a7:	48 8d 35 e6 00 00 00 	lea    rsi,[rip+0xe6]        # 1294 <s_gap>
    11ae:	b9 08 00 00 00       	mov    ecx,0x8
    11b3:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    11b5:	4c 89 e8             	mov    rax,r13
    11b8:	b9 e8 03 00 00       	mov    ecx,0x3e8
    11bd:	48 f7 e1             	mul    rcx
    11c0:	8b 0c 25 14 00 00 00 	mov    ecx,DWORD PTR ds:0x14
    11c7:	48 f7 f1             	div    rcx
    11ca:	45 31 ed             	xor    r13d,r13d
    11cd:	e8 46 00 00 00       	call   1218 <put_dec>
    11d2:	c6 07 0a             	mov    BYTE PTR [rdi],0xa
    11d5:	48 ff c7             	inc    rdi
    11d8:	49 8d b6 00 01 00 00 	lea    rsi,[r14+0x100]
    11df:	48 89 f9             	mov    rcx,rdi
    11e2:	48 29 f1             	sub    rcx,rsi
    11e5:	66 ba f8 03          	mov    dx,0x3f8
    11e9:	48 89 cf             	mov    rdi,rcx
    11ec:	48 83 ff 04          	cmp    rdi,0x4
    11f0:	72 0c                	jb     11fe <write_line+0x8a>
    11f2:	6f                   	outs   dx,DWORD PTR ds:[rsi]
    11f3:	e8 9f fe ff ff       	call   1097 <tick>
    11f8:	48 83 ef 04          	sub    rdi,0x4
    11fc:	eb ee                	jmp    11ec <write_line+0x78>
    11fe:	40 f6 c7 02          	test   dil,0x2
    1202:	74 07                	je     120b <write_line+0x97>
    1204:	66 6f                	outs   dx,WORD PTR ds:[rsi]
    1206:	e8 8c fe ff ff       	call   1097 <tick>
    120b:	40 f6 c7 01          	test   dil,0x1
    120f:	74 06                	je     1217 <write_line+0xa3>
    1211:	6e                   	outs   dx,BYTE PTR ds:[rsi]
    1212:	e8 80 fe ff ff       	call   1097 <tick>
    1217:	c3                   	ret

0000000000001218 <put_dec>:
    1218:	49 8d 76 40          	lea    rsi,[r14+0x40]
    121c:	b9 0a 00 00 00       	mov    ecx,0xa
    1221:	31 d2                	xor    edx,edx
    1223:	48 f7 f1             	div    rcx
    1226:	80 c2 30             	add    dl,0x30
    1229:	48 ff ce             	dec    rsi
    122c:	88 16                	mov    BYTE PTR [rsi],dl
    122e:	48 85 c0             	test   rax,rax
    1231:	75 ee                	jne    1221 <put_dec+0x9>
    1233:	49 8d 4e 40          	lea    rcx,[r14+0x40]
    1237:	48 29 f1             	sub    rcx,rsi
    123a:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    123c:	c3                   	ret

000000000000123d <panic_tsc>:
    123d:	48 8d 35 58 00 00 00 	lea    rsi,[rip+0x58]        # 129c <m_tsc>
    1244:	b9 0a 00 00 00       	mov    ecx,0xa
    1249:	eb 36                	jmp    1281 <panic>

000000000000124b <panic_regs>:
    124b:	48 8d 35 54 00 00 00 	lea    rsi,[rip+0x54]        # 12a6 <m_regs>
    1252:	b9 0b 00 00 00       	mov    ecx,0xb
    1257:	eb 28                	jmp    1281 <panic>

0000000000001259 <panic_xmm>:
    1259:	48 8d 35 51 00 00 00 	lea    rsi,[rip+0x51]        # 12b1 <m_xmm>
    1260:	b9 0a 00 00 00       	mov    ecx,0xa
    1265:	eb 1a                	jmp    1281 <panic>

0000000000001267 <panic_journal>:
    1267:	48 8d 35 4d 00 00 00 	lea    rsi,[rip+0x4d]        # 12bb <m_journal>
    126e:	b9 0e 00 00 00       	mov    ecx,0xe
    1273:	eb 0c                	jmp    1281 <panic>

0000000000001275 <panic_device>:
    1275:	48 8d 35 4d 00 00 00 	lea    rsi,[rip+0x4d]        # 12c9 <m_device>
    127c:	b9 0d 00 00 00       	mov    ecx,0xd

0000000000001281 <panic>:
    1281:	66 ba f8 03          	mov    dx,0x3f8
    1285:	f3 6e                	rep outs dx,BYTE PTR ds:[rsi]
    1287:	f4                   	hlt
    1288:	eb fd                	jmp    1287 <panic+0x6>

000000000000128a <s_vcpu>:
    128a:	76 63                	jbe    12ef <one+0xf>
    128c:	70 75                	jo     1303 <one+0x23>
    128e:	3d                   	.byte 0x3d

000000000000128f <s_seq>:
    128f:	20 73 65             	and    BYTE PTR [rbx+0x65],dh
    1292:	71 3d                	jno    12d1 <m_device+0x8>

0000000000001294 <s_gap>:
    1294:	20 67 61             	and    BYTE PTR [rdi+0x61],ah
    1297:	70 5f                	jo     12f8 <one+0x18>
    1299:	75 73                	jne    130e <one+0x2e>
    129b:	3d                   	.byte 0x3d

000000000000129c <m_tsc>:
    129c:	50                   	push   rax
    129d:	41                   	rex.B
    129e:	4e                   	rex.WRX
    129f:	49                   	rex.WB
    12a0:	43 20 74 73 63       	and    BYTE PTR [r11+r14*2+0x63],sil
    12a5:	0a                   	.byte 0xa

00000000000012a6 <m_regs>:
    12a6:	50                   	push   rax
    12a7:	41                   	rex.B
    12a8:	4e                   	rex.WRX
    12a9:	49                   	rex.WB
    12aa:	43 20 72 65          	rex.XB and BYTE PTR [r10+0x65],sil
    12ae:	67 73 0a             	addr32 jae 12bb <m_journal>

00000000000012b1 <m_xmm>:
    12b1:	50                   	push   rax
    12b2:	41                   	rex.B
    12b3:	4e                   	rex.WRX
    12b4:	49                   	rex.WB
    12b5:	43 20 78 6d          	rex.XB and BYTE PTR [r8+0x6d],dil
    12b9:	6d                   	ins    DWORD PTR es:[rdi],dx
    12ba:	0a                   	.byte 0xa

00000000000012bb <m_journal>:
    12bb:	50                   	push   rax
    12bc:	41                   	rex.B
    12bd:	4e                   	rex.WRX
    12be:	49                   	rex.WB
    12bf:	43 20 6a 6f          	rex.XB and BYTE PTR [r10+0x6f],bpl
    12c3:	75 72                	jne    1337 <one+0x57>
    12c5:	6e                   	outs   dx,BYTE PTR ds:[rsi]
    12c6:	61                   	(bad)
    12c7:	6c                   	ins    BYTE PTR es:[rdi],dx
    12c8:	0a                   	.byte 0xa

00000000000012c9 <m_device>:
    12c9:	50                   	push   rax
    12ca:	41                   	rex.B
    12cb:	4e                   	rex.WRX
    12cc:	49                   	rex.WB
    12cd:	43 20 64 65 76       	and    BYTE PTR [r13+r12*2+0x76],spl
    12d2:	69                   	.byte 0x69
    12d3:	63 65 0a             	movsxd esp,DWORD PTR [rbp+0xa]

00000000000012d6 <m_end>:
    12d6:	66 2e 0f 1f 84 00 00 	cs nop WORD PTR [rax+rax*1+0x0]
    12dd:	00 00 00

00000000000012e0 <one>:
    12e0:	01 00                	add    DWORD PTR [rax],eax
	...
"""
